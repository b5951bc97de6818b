/* moecast's predictor inside llama.cpp, in C: the prefetch harness of
 * moecast_llamacpp.py (see docs/guide.md#llamacpp) without Python in the eval callback.
 *
 *   moecast_prefetch [-r resident%=25] [-n new_tokens=32] [-R rounds=3] [-b MODES=auto,1]
 *                    [-t READ_US,LAYER_US] [-G] [-a [-w | -d MS]]
 *                    [-j THREADS[,WHILE_FORECASTING]] [-s STEPS.csv]
 *                    MODEL.gguf PROMPTS.txt [PREDICTOR_DIR]
 *   moecast_prefetch -p TRACE [-N steps] [options] MODEL.gguf [PREDICTOR_DIR]
 *
 * Greedy decoding of every prompt (one per line), on demand and, with a predictor (an
 * moecast predictor, through libmoecast's C ABI), with forecast experts staged,
 * the rounds of each mode alternating (every second in reverse order; each mode's lowest
 * and highest round over on demand's is printed beside the ratio of the means). MODES is
 * a comma list: `auto` stages what moecast's planner judges worth a read (mc_planner_*:
 * every forecast layer's top-k offered; it times the reads, their issuing and the layers,
 * or plans with -t's stated microseconds) in the resident set itself, and moecast's
 * prefetch guard (mc_guard_*; -G: off) turns forecasting off in windows of steps where it
 * measures slower (one guard over all rounds, as a runtime keeps one); a count N stages
 * the best N of the next layer in staging slots of their own (2 x N); with -p, `oracle`
 * plans as `auto` from the trace's own experts, as far ahead as the predictor (3 layers
 * without one): the ceiling, and each mode's share of its gain is printed. Forecasts run
 * on the decode thread: the token's own at its start (its first layer only), the layers
 * ahead in the eval callback while the routed layer's missing experts are read, which
 * hides them and their reads' issuing (a layer with none forecasts nothing). A predictor
 * trained with --features hidden also reads the routed layer's router input: llama.cpp's
 * ffn_norm-L or, with -p, the trace's record (the replayed model's own would not match
 * the forced routing); the model's (or the trace's) width must be the predictor's.
 * llama.cpp's CPU threads wait for each other at every operation, spinning, so a
 * forecast on another thread, taking one's core, stalls them all: 5-6% of decode time on
 * 2 cores, against 1% during the reads. With -a the predictor runs on a thread of its own
 * that owns the session: the callback only queues "layers 0..l routed" (a forecast is
 * dropped when two wait); -a -w waits for each (none dropped or late, whatever the
 * machine's speed; tests); -a -d MS holds each forecast MS milliseconds before it is
 * offered (all land late: tests of the rule that drops them). Staged reads are issued
 * outside the resident set's lock. llama.cpp memory-maps the GGUF; the page cache is the
 * fast memory, `resident%` of the experts are kept, residency is read with mincore when a
 * layer routes (before its experts run), missing experts are read whole and waited for
 * (the stall). Prints one line per mode.
 * With -p the trace's sequences are decoded from their own ids instead of the prompts,
 * every layer's experts forced to the recorded ones (up to -N decode steps in all).
 * -j sets llama.cpp's threads, and those of steps that forecast (default: the cores
 * online; with -a one fewer while forecasting, leaving the prefetcher thread a core; the
 * guard, switching forecasts off where they measure slower, switches back to all cores).
 * -s writes every timed decode step to a CSV (mode, round, whether it forecast, seconds,
 * staged reads issued, demand reads, stall and issuing seconds): llamacpp/step_costs.py
 * fits what a staged and a demand read add to a step on this machine (step_log.c).
 * Linux only. Build: make target/moecast_prefetch (links the wheel's libllama and libmoecast). */
#define _GNU_SOURCE
#include <getopt.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "expert_residency.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#include "moecast.h"
#include "prefetcher.h"
#include "step_log.h"

#define MAX_MODES 8

/* ---- the eval callback ---- */
typedef struct {
    Residency *res;
    Prefetcher *session; /* NULL: on demand */
    uint32_t token;
    int prefill, count, known, forecasting;
    uint16_t routed[MAX_LAYERS * MAX_K];
    uint16_t *prefill_ids; /* [row][layer][k] of the prompt's batch, for the session */
    int prefill_rows;
    const uint16_t *forced; /* replay: the token's recorded experts [layer][k], routed instead */
    /* a predictor that reads router inputs: the last routed layer's (the session's
     * `input_dim` wide), llama.cpp's ffn_norm-L or, replayed, the trace's record of
     * token `pos` of `seq` */
    float *input;
    const struct mc_trace *trace;
    uint32_t seq, pos;
    int input_layer; /* the layer whose ffn_norm the step copied last (-1: none yet) */
    int error;
    char message[320]; /* the first error's */
} Harness;

/* Records the callback's first error (llama_decode then fails; main dies with it). */
static bool callback_error(Harness *h, const char *fmt, ...) {
    if (!h->error) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(h->message, sizeof h->message, fmt, ap);
        va_end(ap);
    }
    h->error = 1;
    return true;
}

/* The layers after the `h->known` routed ones, forecast from their routing: by default
 * (no -a) on the decode thread while a layer's missing experts are read (use_experts'
 * `meanwhile`; a layer without any forecasts nothing), with -a queued at once. */
static void forecast_ahead(void *arg) {
    Harness *h = arg;
    prefetcher_forecast(h->session, JOB_AHEAD, h->token, h->known, h->routed, h->known * h->res->ex->top_k, h->input);
}

static bool callback(struct ggml_tensor *t, bool ask, void *user) {
    Harness *h = user;
    const char *name = ggml_get_name(t);
    int layer;
    if (h->input && !h->trace && !strncmp(name, "ffn_norm-", 9) && sscanf(name + 9, "%d", &layer) == 1) {
        if (ask) return h->forecasting && !h->prefill; /* the router's input: its last row is the decoded token's */
        if (t->type != GGML_TYPE_F32 || (size_t)t->ne[0] != h->session->input_dim)
            return callback_error(h, "%s is not f32 x %zu (the predictor's router input)", name, h->session->input_dim);
        ggml_backend_tensor_get(t, h->input, (size_t)(t->ne[1] - 1) * t->nb[1], h->session->input_dim * sizeof(float));
        h->input_layer = layer;
        return true;
    }
    if (strncmp(name, "ffn_moe_topk-", 13) || sscanf(name + 13, "%d", &layer) != 1) return !ask;
    if (ask) return true;
    Experts *ex = h->res->ex;
    int k = (int)t->ne[0], n = (int)t->ne[1];
    if (t->type != GGML_TYPE_I32 || k != ex->top_k || layer >= ex->n_moe)
        return callback_error(h, "%s is not i32 x top-%d of an MoE layer", name, ex->top_k);
    int32_t ids[MAX_K];
    int seen[MAX_K * 64], n_seen = 0;
    for (int row = 0; row < n; row++) {
        ggml_backend_tensor_get(t, ids, (size_t)row * t->nb[1], (size_t)k * sizeof(int32_t));
        if (h->prefill) { /* the prompt's batch: every row's experts ran */
            for (int j = 0; j < k && n_seen < MAX_K * 64; j++) {
                int dup = 0;
                for (int s = 0; s < n_seen; s++) dup |= seen[s] == ids[j];
                if (!dup) seen[n_seen++] = ids[j];
            }
            if (h->session && row < h->prefill_rows)
                for (int j = 0; j < k; j++) h->prefill_ids[((size_t)row * ex->n_moe + layer) * k + j] = (uint16_t)ids[j];
            continue;
        }
        if (h->forced) { /* the recorded experts run; llama.cpp weights them by the router */
            for (int j = 0; j < k; j++) ids[j] = h->forced[layer * k + j];
            ggml_backend_tensor_set(t, ids, (size_t)row * t->nb[1], (size_t)k * sizeof(int32_t));
        }
        int use[MAX_K];
        for (int j = 0; j < k; j++) use[j] = ids[j], h->routed[layer * k + j] = (uint16_t)ids[j];
        h->known = layer + 1;
        /* the routing is all the next layers' forecast needs: it runs while this layer's
         * missing experts are read (on this thread, or with -a on the prefetcher's) */
        int ahead = h->session && h->forecasting && layer + 1 < ex->n_moe;
        if (ahead && h->input && h->trace &&
            mc_trace_router_input(h->trace, h->seq, h->pos, (uint32_t)layer, h->input, h->session->input_dim))
            return callback_error(h, "%s", mc_last_error());
        if (ahead && h->input && !h->trace && h->input_layer != layer)
            return callback_error(h, "llama.cpp's graph gave no ffn_norm-%d (the router's input the predictor reads)", layer);
        if (ahead && !h->session->inline_jobs) forecast_ahead(h);
        use_experts(h->res, layer, use, k, 1, h->count, ahead && h->session->inline_jobs ? forecast_ahead : NULL, h);
    }
    if (h->prefill) use_experts(h->res, layer, seen, n_seen, 0, 0, NULL, NULL);
    return true;
}

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

/* One mode's round: llama.cpp's context and batch, and what decides its prefetch. */
typedef struct {
    struct llama_context *ctx;
    struct llama_batch batch;
    Harness *h;
    struct mc_planner *planner;
    struct mc_guard *guard;
    int forecasting, n_moe, top_k;
    int threads[2];       /* llama.cpp's threads without and with forecasts */
    uint64_t steps_fewer; /* counted steps run on fewer threads */
    const char *model_path;
    FILE *steps_csv;   /* -s: one row per timed step */
    StepCounters last; /* the residency's counters at the last step */
    const char *mode;
    int round;
} Decoder;

/* Decodes `token` at `pos` as one step: the guard asked, the planner told, the token's
 * layers forecast, llama.cpp run, the routing observed. Returns its seconds. */
static double decode_step(Decoder *d, llama_token token, int pos, int count) {
    Harness *h = d->h;
    double t0 = now_s();
    uint8_t on = 1;
    if (d->guard) mc_guard_enabled(d->guard, &on);
    h->token = (uint32_t)token, h->count = count, h->known = 0, h->forecasting = d->forecasting && on, h->input_layer = -1;
    int threads = d->threads[h->forecasting];
    if (llama_n_threads(d->ctx) != threads) llama_set_n_threads(d->ctx, threads, threads);
    d->steps_fewer += count && llama_n_threads(d->ctx) < d->threads[0];
    pthread_mutex_lock(&h->res->mu);
    h->res->step++, h->res->next_layer = 0;
    if (d->planner) mc_planner_token_started(d->planner);
    pthread_mutex_unlock(&h->res->mu);
    if (h->session) h->session->truth = h->forced;
    if (h->forecasting) prefetcher_forecast(h->session, JOB_NEXT, h->token, 0, NULL, 0, NULL);
    d->batch.n_tokens = 1;
    d->batch.token[0] = token, d->batch.pos[0] = pos, d->batch.n_seq_id[0] = 1, d->batch.seq_id[0][0] = 0;
    d->batch.logits[0] = 1;
    if (llama_decode(d->ctx, d->batch) || h->error) die(d->model_path, h->error ? h->message : "llama_decode failed");
    if (h->session && h->known == d->n_moe) prefetcher_post(h->session, JOB_OBSERVE, h->token, 0, h->routed, d->n_moe * d->top_k, NULL);
    double dt = now_s() - t0;
    if (d->guard && count) mc_guard_step_done(d->guard, dt, NULL); /* the steps the table times */
    if (d->steps_csv) step_log_step(d->steps_csv, &d->last, h->res, d->mode, d->round, h->forecasting, dt, count);
    return dt;
}

/* What one mode counted over its rounds. */
typedef struct {
    int budget; /* -1: on demand; 0: planned; N: a fixed budget */
    int oracle; /* planned, from the replayed trace's own experts */
    double tps, resident, demand, staged, wasted, stall, issue;
    double round_tps, ratio_min, ratio_max; /* the last round's tokens/s; each round's over on demand's */
    uint64_t steps, steps_off, steps_fewer;
    struct mc_plan_report plan;
    struct mc_guard *guard; /* planned: kept over the rounds, as a runtime keeps it over requests */
} ModeTotals;

static void mode_name(const ModeTotals *mt, char *name, size_t size) {
    if (mt->oracle) snprintf(name, size, "oracle");
    else if (mt->budget < 0) snprintf(name, size, "on-demand");
    else if (mt->budget == 0) snprintf(name, size, "planned");
    else snprintf(name, size, "budget-%d", mt->budget);
}

static void usage(const char *argv0) {
    fprintf(stderr, "usage: %s [-r resident%%=25] [-n new_tokens=32] [-R rounds=3] [-b MODES=auto,1] "
            "[-t READ_US,LAYER_US] [-G] [-a [-w | -d MS]] [-j THREADS[,WHILE_FORECASTING]] [-s STEPS.csv] MODEL.gguf PROMPTS.txt [PREDICTOR_DIR]\n"
            "       %s -p TRACE [-N steps] [options] MODEL.gguf [PREDICTOR_DIR]\n", argv0, argv0);
    exit(2);
}

int main(int argc, char **argv) {
    double resident_pct = 25, read_us = 0, layer_us = 0;
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int new_tokens = 32, rounds = 3, use_guard = 1, inline_forecasts = 1, wait_forecasts = 0, threads_given = 0, opt;
    int threads[2] = {cores > 1 ? (int)cores : 1, cores > 1 ? (int)cores - 1 : 1}; /* on demand, forecasting */
    long max_steps = 0;
    const char *modes_arg = "auto,1", *trace_path = NULL;
    int delay_ms = 0;
    FILE *steps_csv = NULL;
    const char *steps_path = NULL;
    while ((opt = getopt(argc, argv, "r:n:R:b:t:Gwaj:p:N:d:s:")) != -1) {
        switch (opt) {
        case 'j': {
            char *end;
            threads_given = 1;
            threads[0] = threads[1] = (int)strtol(optarg, &end, 10);
            if (*end == ',') threads[1] = (int)strtol(end + 1, &end, 10);
            if (*end || threads[1] < 1 || threads[1] > threads[0])
                die("-j", "takes THREADS or THREADS,WHILE_FORECASTING: at least 1, the second not above the first");
            break;
        }
        case 'p': trace_path = optarg; break;
        case 'N': max_steps = atol(optarg); break;
        case 'r': resident_pct = atof(optarg); break;
        case 'n': new_tokens = atoi(optarg); break;
        case 'R': rounds = atoi(optarg); break;
        case 'b': modes_arg = optarg; break;
        case 't':
            if (sscanf(optarg, "%lf,%lf", &read_us, &layer_us) != 2 || !(read_us > 0 && layer_us > 0))
                die("-t", "takes READ_US,LAYER_US, both above 0");
            break;
        case 'G': use_guard = 0; break;
        case 'w': wait_forecasts = 1; break;
        case 'a': inline_forecasts = 0; break;
        case 'd': delay_ms = atoi(optarg); break;
        case 's': steps_path = optarg; break;
        default: usage(argv[0]);
        }
    }
    if (inline_forecasts && wait_forecasts) die("-w", "waits for the prefetcher thread's forecasts: give -a too");
    if (delay_ms && (inline_forecasts || wait_forecasts || delay_ms < 0))
        die("-d", "delays the prefetcher thread's forecasts (milliseconds, above 0): give -a, without -w");
    if (inline_forecasts && !threads_given) threads[1] = threads[0]; /* no forecasting thread to leave a core to */
    int positional = trace_path ? 1 : 2; /* MODEL [PROMPTS] before the optional predictor */
    if (argc - optind < positional || argc - optind > positional + 1) usage(argv[0]);
    const char *model_path = argv[optind], *prompts_path = trace_path ? NULL : argv[optind + 1];
    const char *pred_dir = argc - optind == positional + 1 ? argv[optind + positional] : NULL;
    if (!(resident_pct > 0 && resident_pct <= 100) || new_tokens < 1 || rounds < 1 || max_steps < 0)
        die("arguments", "-r in (0, 100], -n and -R at least 1, -N at least 0");
    char line[65536], where[4200];
    static ModeTotals modes[MAX_MODES];
    int n_modes = 1;
    modes[0].budget = -1;
    for (const char *m = modes_arg; *m; m += strcspn(m, ",") + (m[strcspn(m, ",")] == ',')) {
        char item[32];
        snprintf(item, sizeof item, "%.*s", (int)strcspn(m, ","), m);
        char *end;
        int oracle = !strcmp(item, "oracle");
        long b = oracle || !strcmp(item, "auto") ? 0 : strtol(item, &end, 10);
        if ((strcmp(item, "auto") && !oracle && (end == item || *end || b < 1 || b > MAX_K)) || n_modes == MAX_MODES)
            die("-b", "takes a comma list of `auto`, `oracle` and expert counts");
        if (oracle && !trace_path) die("-b", "`oracle` forecasts from a replayed trace: give -p TRACE");
        if (!oracle && !pred_dir) continue; /* forecasts need a predictor */
        modes[n_modes].oracle = oracle;
        modes[n_modes++].budget = (int)b;
    }

    static Experts ex;
    read_experts(model_path, &ex);
    int total = ex.n_moe * ex.n_experts, capacity = (int)(resident_pct / 100 * total + 0.5);
    if (capacity < ex.top_k + 1) die("-r", "too small for a layer's top-k and one staged expert");
    for (int mode = 1; mode < n_modes; mode++)
        if (modes[mode].budget > ex.n_experts) die("-b", "a budget exceeds the model's experts per layer");

    struct mc_predictor *pred = NULL;
    uint32_t horizon = 0, input_dim = 0; /* the predictor's router-input width (0: ids only) */
    if (pred_dir) {
        uint32_t m, e, k;
        if (mc_predictor_open(pred_dir, &pred) || mc_predictor_shape(pred, &m, &e, &k, &horizon)) die(pred_dir, mc_last_error());
        mc_predictor_router_input_dim(pred, &input_dim);
        if ((int)m != ex.n_moe || (int)e != ex.n_experts || (int)k != ex.top_k) die(pred_dir, "predictor shape does not match the model");
    }
    struct mc_trace *trace = NULL;
    uint32_t n_seqs = 0;
    if (trace_path) {
        uint32_t m, e, k;
        if (mc_trace_open(trace_path, &trace) || mc_trace_shape(trace, &m, &e, &k, &n_seqs)) die("-p", mc_last_error()); /* names the file */
        if ((int)m != ex.n_moe || (int)e != ex.n_experts || (int)k != ex.top_k)
            die(trace_path, "the trace's MoE layers, experts or top-k differ from the model's");
        uint32_t dim = 0;
        int learned = 0; /* a mode that forecasts with the predictor (the oracle reads no inputs) */
        for (int mode = 1; mode < n_modes; mode++) learned |= !modes[mode].oracle;
        mc_trace_router_input_dim(trace, &dim);
        char recorded[32] = "none";
        if (dim) snprintf(recorded, sizeof recorded, "them %u wide", dim);
        snprintf(where, sizeof where, "%s reads router inputs %u wide; replayed, they come from the trace, which records %s",
                 pred_dir ? pred_dir : "", input_dim, recorded);
        if (learned && input_dim && dim != input_dim) die(trace_path, where);
    }

    llama_log_set(quiet, NULL);
    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.load_mode = LLAMA_LOAD_MODE_MMAP;
    mp.n_gpu_layers = 0;
    mp.use_extra_bufts = false;
    struct llama_model *model = llama_model_load_from_file(model_path, mp);
    if (!model) die(model_path, "llama.cpp could not load the model");
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    if (input_dim && !trace && llama_model_n_embd(model) != (int32_t)input_dim) {
        snprintf(where, sizeof where, "reads router inputs %u wide; %s's are %d (a predictor of another model?)", input_dim,
                 model_path, llama_model_n_embd(model));
        die(pred_dir, where);
    }
    int n_ctx = llama_model_n_ctx_train(model) < 4096 ? llama_model_n_ctx_train(model) : 4096;

    /* prompts, tokenized by llama.cpp */
    FILE *pf = prompts_path ? fopen(prompts_path, "r") : NULL;
    if (prompts_path && !pf) die(prompts_path, "cannot open");
    static llama_token prompts[1024][512];
    int lens[1024], n_prompts = 0;
    for (int lineno = 1; pf && n_prompts < 1024 && fgets(line, sizeof line, pf); lineno++) {
        line[strcspn(line, "\n")] = 0;
        if (!line[0]) continue;
        int n = llama_tokenize(vocab, line, (int)strlen(line), prompts[n_prompts], 512, false, true);
        snprintf(where, sizeof where, "%s:%d", prompts_path, lineno);
        if (n <= 0 || n + new_tokens > n_ctx) die(where, "the prompt has no tokens or, with -n, exceeds the context (512 tokens at most)");
        lens[n_prompts++] = n;
    }
    if (pf) fclose(pf);

    static Harness h;
    uint16_t *prefill_ids = calloc((size_t)512 * ex.n_moe * ex.top_k, sizeof(uint16_t));
    uint32_t *reads = calloc((size_t)total, sizeof(uint32_t));
    float *input = input_dim ? calloc(input_dim, sizeof(float)) : NULL;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = (uint32_t)n_ctx;
    cp.n_threads = cp.n_threads_batch = threads[0];
    cp.cb_eval = callback;
    cp.cb_eval_user_data = &h;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) die(model_path, "llama.cpp could not create a context");
    struct llama_batch batch = llama_batch_init(n_ctx, 0, 1);
    int n_vocab = llama_vocab_n_tokens(vocab);

    printf("%s: %d of %d experts resident (%.0f%%), %zu bytes per expert, llama.cpp threads %d (%d while forecasting), "
           "forecasts %s, ", model_path, capacity, total, resident_pct, ex.size[0][0] * 3, threads[0], threads[1],
           inline_forecasts ? "on the decode thread during reads" : "on a thread of their own");
    if (input_dim) printf("reading router inputs (%u wide) from %s, ", input_dim, trace ? "the trace" : "llama.cpp's ffn_norm");
    printf("%d alternating round(s), ", rounds);
    if (trace && max_steps) printf("%u sequences of %s replayed (their experts forced), up to %ld decode steps\n", n_seqs, trace_path, max_steps);
    else if (trace) printf("%u sequences of %s replayed (their experts forced)\n", n_seqs, trace_path);
    else printf("greedy, up to %d new tokens per prompt\n", new_tokens);
    if (steps_path) steps_csv = step_log_open(steps_path);
    for (int round = 0; round < rounds; round++) {
        for (int turn = 0; turn < n_modes; turn++) {
            /* every second round runs the modes in reverse, so a steady drift in the
             * machine's speed cancels over an even number of rounds */
            ModeTotals *mt = &modes[round % 2 ? n_modes - 1 - turn : turn];
            int b = mt->budget;
            char name[24];
            mode_name(mt, name, sizeof name);
            struct mc_planner *planner = NULL;
            if (b == 0 && mc_planner_new((uint32_t)ex.n_moe, (uint32_t)ex.n_experts, (uint32_t)ex.top_k, (uint32_t)capacity,
                                         read_us, layer_us, &planner))
                die("planner", mc_last_error());
            if (b == 0 && use_guard && capacity < total && !mt->guard && mc_guard_new(8, 6, &mt->guard))
                die("prefetch guard", mc_last_error());
            struct mc_guard *guard = mt->guard;
            int slots = b > 0 ? (2 * b < capacity - ex.top_k ? 2 * b : capacity - ex.top_k) : 0;
            static Residency res;
            residency_init(&res, &ex, capacity, slots, planner, read_us > 0);
            res.tell_issue = inline_forecasts && read_us == 0; /* staged reads issued on the decode thread */
            memset(&h, 0, sizeof h);
            h.res = &res;
            h.prefill_ids = prefill_ids;
            h.trace = trace;
            static Prefetcher w;
            if (b >= 0) {
                memset(&w, 0, sizeof w);
                if (!mt->oracle && mc_session_new(pred, &w.session)) die(pred_dir, mc_last_error());
                w.res = &res, w.reads = reads, w.oracle = mt->oracle;
                /* the oracle reads as far ahead as the predictor (3 layers without one) */
                w.budget = b, w.horizon = horizon ? (int)horizon : 3, w.inline_jobs = inline_forecasts;
                w.wait = wait_forecasts, w.delay_ms = delay_ms, w.input_dim = mt->oracle ? 0 : input_dim;
                prefetcher_start(&w);
                h.session = &w, h.input = w.input_dim ? input : NULL;
            }
            /* with every expert resident there is nothing to forecast */
            Decoder d = {.ctx = ctx, .batch = batch, .h = &h, .planner = planner, .guard = guard,
                         .forecasting = h.session && capacity < total, .n_moe = ex.n_moe, .top_k = ex.top_k,
                         .threads = {threads[0], threads[1]}, .model_path = model_path,
                         .steps_csv = steps_csv, .mode = name, .round = round + 1};
            double decode_s = 0;
            long steps = 0;
            for (uint32_t s = 0; s < n_seqs && (!max_steps || steps < max_steps); s++) { /* replay */
                uint32_t len;
                const uint32_t *tokens;
                const uint16_t *experts;
                if (mc_trace_sequence(trace, s, &len, &tokens, &experts)) die(trace_path, mc_last_error());
                llama_memory_clear(llama_get_memory(ctx), true);
                if (h.session) prefetcher_post(h.session, JOB_RESET, 0, 0, NULL, 0, NULL);
                h.seq = s;
                for (uint32_t pos = 0; pos < len && (int)pos < n_ctx && (int)tokens[pos] < n_vocab; pos++) {
                    if (max_steps && steps >= max_steps) break;
                    h.forced = experts + (size_t)pos * ex.n_moe * ex.top_k, h.pos = pos;
                    double dt = decode_step(&d, (llama_token)tokens[pos], (int)pos, pos > 0);
                    if (pos > 0) decode_s += dt, steps++;
                }
                h.forced = NULL;
            }
            for (int p = 0; p < n_prompts; p++) {
                llama_memory_clear(llama_get_memory(ctx), true);
                if (h.session) prefetcher_post(h.session, JOB_RESET, 0, 0, NULL, 0, NULL);
                batch.n_tokens = lens[p];
                for (int i = 0; i < lens[p]; i++) {
                    batch.token[i] = prompts[p][i], batch.pos[i] = i, batch.n_seq_id[i] = 1;
                    batch.seq_id[i][0] = 0, batch.logits[i] = 1; /* every row: the last layer routes them all */
                }
                h.prefill = 1, h.count = 0, h.prefill_rows = lens[p];
                if (llama_decode(ctx, batch)) die(model_path, "llama_decode failed");
                h.prefill = 0;
                for (int i = 0; h.session && i < lens[p]; i++)
                    prefetcher_post(h.session, JOB_OBSERVE, (uint32_t)prompts[p][i], 0, h.prefill_ids + (size_t)i * ex.n_moe * ex.top_k,
                         ex.n_moe * ex.top_k, NULL);
                int pos = lens[p];
                for (int step = 0; step < new_tokens - 1 && pos < n_ctx; step++) {
                    const float *logits = llama_get_logits_ith(ctx, -1);
                    llama_token next = 0;
                    for (int v = 1; v < n_vocab; v++)
                        if (logits[v] > logits[next]) next = v;
                    if (llama_vocab_is_eog(vocab, next)) break;
                    decode_s += decode_step(&d, next, pos++, 1);
                    steps++;
                }
            }
            if (h.session) {
                if (prefetcher_stop(&w)) die(pred_dir ? pred_dir : "forecasts", w.message);
                if (w.session) mc_session_free(w.session);
            }
            residency_finish(&res);
            mt->round_tps = steps / decode_s, mt->tps += mt->round_tps, mt->steps += (uint64_t)steps;
            uint64_t off = mt->steps_off;
            if (guard) mc_guard_steps_off(guard, &mt->steps_off);
            fprintf(stderr, "round %d/%d %s: %.1f tokens/s", round + 1, rounds, name, steps / decode_s);
            if (guard) fprintf(stderr, ", %llu of %ld steps without prefetch", (unsigned long long)(mt->steps_off - off), steps);
            fprintf(stderr, "\n");
            mt->resident += (double)res.resident_uses / (res.uses ? res.uses : 1);
            mt->demand += res.bytes_demand, mt->staged += res.bytes_staged, mt->wasted += res.bytes_wasted;
            mt->stall += res.stall_s, mt->issue += res.issue_s;
            if (planner) mc_planner_report(planner, &mt->plan);
            mt->steps_fewer += d.steps_fewer;
            residency_free(&res);
            mc_planner_free(planner);
        }
        for (int mode = 0; mode < n_modes; mode++) {
            ModeTotals *mt = &modes[mode];
            double ratio = mt->round_tps / modes[0].round_tps;
            if (!round || ratio < mt->ratio_min) mt->ratio_min = ratio;
            if (!round || ratio > mt->ratio_max) mt->ratio_max = ratio;
        }
    }

    printf("%-10s %18s %10s %10s %10s %8s %9s %13s %15s %10s\n", "mode", "resident when used", "demand MB", "staged MB", "wasted MB",
           "stall s", "tokens/s", "vs on-demand", "rounds min-max", "issuing s");
    int oracle = -1;
    for (int mode = 0; mode < n_modes; mode++) {
        ModeTotals *mt = &modes[mode];
        char name[24];
        mode_name(mt, name, sizeof name);
        if (mt->oracle) oracle = mode;
        printf("%-10s %17.1f%% %10.2f %10.2f %10.2f %8.3f %9.1f %12.2fx %9.2f-%.2fx %10.3f\n", name, 100 * mt->resident / rounds,
               mt->demand / rounds / 1e6, mt->staged / rounds / 1e6, mt->wasted / rounds / 1e6, mt->stall / rounds,
               mt->tps / rounds, mt->tps / modes[0].tps, mt->ratio_min, mt->ratio_max, mt->issue / rounds);
    }
    for (int mode = 0; mode < n_modes; mode++)
        if (modes[mode].budget == 0) {
            struct mc_plan_report *p = &modes[mode].plan;
            char name[24];
            mode_name(&modes[mode], name, sizeof name);
            printf("planner (%s, last round): offered %llu, staged %llu, too late %llu, not worth a read %llu; read %.0f us, "
                   "layer %.0f us; %llu of %llu steps without prefetch (all rounds, one guard)\n", name,
                   (unsigned long long)p->offered, (unsigned long long)p->staged, (unsigned long long)p->late,
                   (unsigned long long)p->not_worth, p->read_us, p->layer_us, (unsigned long long)modes[mode].steps_off,
                   (unsigned long long)modes[mode].steps);
            mc_guard_free(modes[mode].guard);
        }
    /* the share of the oracle's gain over on demand that each forecasting mode reaches,
     * where that gain is more than 2% */
    if (oracle > 0) {
        double gain = modes[oracle].tps - modes[0].tps;
        printf("oracle's gain over on demand %.2fx; share of it:", modes[oracle].tps / modes[0].tps);
        for (int mode = 1; mode < n_modes; mode++) {
            char name[24];
            if (mode == oracle) continue;
            mode_name(&modes[mode], name, sizeof name);
            if (gain > 0.02 * modes[0].tps) printf(" %s %.0f%%", name, 100 * (modes[mode].tps - modes[0].tps) / gain);
            else printf(" %s n/a", name);
        }
        printf("\n");
    }
    if (threads[1] < threads[0]) {
        printf("steps with %d llama.cpp thread(s) (forecasting), of all:", threads[1]);
        for (int mode = 0; mode < n_modes; mode++) {
            char name[24];
            mode_name(&modes[mode], name, sizeof name);
            printf("%s %s %llu of %llu", mode ? "," : "", name, (unsigned long long)modes[mode].steps_fewer,
                   (unsigned long long)modes[mode].steps);
        }
        printf("\n");
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    if (pred) mc_predictor_free(pred);
    mc_trace_free(trace);
    free(prefill_ids);
    free(reads);
    free(input);
    if (steps_csv) step_log_close(steps_csv);
    return 0;
}
