/* moecast's predictor inside llama.cpp, in C: the prefetch harness of
 * moecast_llamacpp.py (see docs/guide.md#llamacpp) without Python in the eval callback.
 *
 *   moecast_prefetch [-r resident%=25] [-n new_tokens=32] [-R rounds=3] [-b MODES=auto,1]
 *                    [-t READ_US,LAYER_US] [-G] [-a [-w | -d MS]]
 *                    [-j THREADS[,WHILE_FORECASTING]] [-s STEPS.csv] [-L]
 *                    [-e lru|lfu|next-use] MODEL.gguf PROMPTS.txt [PREDICTOR_DIR]
 *   moecast_prefetch -p TRACE [-N steps] [-W STEPS] [options] MODEL.gguf [PREDICTOR_DIR]
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
 * -W STEPS (with -p) has the modes take turns every STEPS steps of a round instead of
 * decoding it one after the other: each decodes the same window of the trace (llama.cpp's
 * memory cut back to its start), every window's turn starting alike, untimed: the mode
 * before's forecasts drained and its staged reads waited for, then the mode's own
 * resident set put back in the page cache; every second window in reverse order. The
 * machine's drift, which moves the same reads' step time by up to 20% between minutes,
 * then falls on every mode alike; each mode's ratio over on demand and share of the
 * oracle's gain over all windows is printed with a 90% interval (a bootstrap over the
 * windows, paired). A staged read still in flight at a window's end lands before the
 * next window, untimed (a read for a layer that has run: a wasted one).
 * -j sets llama.cpp's threads, and those of steps that forecast (default: the cores
 * online; with -a one fewer while forecasting, leaving the prefetcher thread a core; the
 * guard, switching forecasts off where they measure slower, switches back to all cores).
 * -s writes every timed decode step to a CSV (mode, round, whether it forecast, seconds,
 * staged reads issued, demand reads, stall and issuing seconds): llamacpp/step_costs.py
 * fits what a staged and a demand read add to a step on this machine (step_log.c).
 * -L prints, per MoE layer, each mode's experts staged for it (of them used there) and
 * read on demand there, a round's mean: where a mode's reads go and which layer it loses.
 * -e sets which used expert every mode's resident set drops first: the least frequently
 * used (default; each use's weight halving every 64 tokens' worth of uses, the least
 * recent of equals), the least recently used, or the one expected latest (next-use:
 * moecast's estimate through mc_next_use_*, from its layer's gaps between an expert's
 * uses and the expert's own use rate, as `moecast run --policy next-use`). A token
 * visits every layer once, so under LRU a set smaller than a token's experts drops each
 * layer's experts just before that layer comes round again and on demand finds none
 * resident; LFU keeps the often-used ones, and the decay lets those of earlier prompts
 * go. In MODES, `lru`, `lfu` and `next-use` add an on-demand mode with that eviction
 * (on-demand-lru, -lfu, -next-use) beside the first, which every ratio is over: the
 * evictions measured over the same windows.
 * decoder.c holds the eval callback and one decode step, mode_round.c a mode's round.
 * Linux only. Build: make target/moecast_prefetch (links the wheel's libllama and libmoecast). */
#define _GNU_SOURCE
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "decoder.h"
#include "expert_residency.h"
#include "mode_round.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "llama.h"
#include "moecast.h"
#include "prefetcher.h"
#include "step_log.h"

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

/* -W: each window's decode seconds, per mode (the modes decode the same steps in it). */
typedef struct {
    int n, cap;
    double *seconds[MAX_MODES];
} WindowLog;

/* Room for one more window. */
static void window_log_grow(WindowLog *log) {
    if (log->n < log->cap) return;
    log->cap = log->cap ? 2 * log->cap : 64;
    for (int m = 0; m < MAX_MODES; m++)
        if (!(log->seconds[m] = realloc(log->seconds[m], (size_t)log->cap * sizeof(double)))) die("-W", "out of memory");
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Prints each mode's tokens/s over on demand's, every window's seconds pooled, and,
 * with an oracle (`oracle` >= 0) gaining more than 2%, each mode's share of that gain,
 * each with a 90% interval over resamplings of the windows (a fixed seed). */
static void window_intervals(const WindowLog *log, const ModeTotals *modes, int n_modes, int oracle) {
    enum { DRAWS = 2000 };
    if (!log->n) return;
    static double ratio[MAX_MODES][DRAWS], share[MAX_MODES][DRAWS];
    uint64_t rng = 0x2545F4914F6CDD1DULL;
    for (int d = 0; d < DRAWS; d++) {
        double sum[MAX_MODES] = {0};
        for (int i = 0; i < log->n; i++) {
            rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27; /* xorshift64* */
            int w = (int)((rng * 0x2545F4914F6CDD1DULL >> 11) % (uint64_t)log->n);
            for (int m = 0; m < n_modes; m++) sum[m] += log->seconds[m][w];
        }
        for (int m = 0; m < n_modes; m++) { /* the same steps in every mode: tokens/s goes as 1 / seconds */
            ratio[m][d] = sum[0] / sum[m];
            share[m][d] = oracle >= 0 ? (1 / sum[m] - 1 / sum[0]) / (1 / sum[oracle] - 1 / sum[0]) : 0;
        }
    }
    double total[MAX_MODES] = {0};
    for (int i = 0; i < log->n; i++)
        for (int m = 0; m < n_modes; m++) total[m] += log->seconds[m][i];
    int forecasting = 0; /* modes besides the oracle that stage */
    for (int m = 1; m < n_modes; m++) forecasting += m != oracle && modes[m].budget >= 0;
    int shares = oracle >= 0 && forecasting && total[0] / total[oracle] > 1.02;
    for (int pass = 0; pass < 1 + shares; pass++) {
        printf(pass ? "; share of the oracle's gain:" : "paired windows (%d), over on demand (90%% interval):", log->n);
        for (int m = 1; m < n_modes; m++) {
            char name[24];
            if (pass && (m == oracle || modes[m].budget < 0)) continue;
            double *x = pass ? share[m] : ratio[m];
            qsort(x, DRAWS, sizeof *x, by_value);
            mode_name(&modes[m], name, sizeof name);
            double point = pass ? (1 / total[m] - 1 / total[0]) / (1 / total[oracle] - 1 / total[0]) : total[0] / total[m];
            if (pass) printf(" %s %.0f%% (%.0f-%.0f%%)", name, 100 * point, 100 * x[DRAWS / 20], 100 * x[DRAWS - 1 - DRAWS / 20]);
            else printf(" %s %.2fx (%.2f-%.2fx)", name, point, x[DRAWS / 20], x[DRAWS - 1 - DRAWS / 20]);
        }
    }
    printf("\n");
}

static void usage(const char *argv0) {
    fprintf(stderr, "usage: %s [-r resident%%=25] [-n new_tokens=32] [-R rounds=3] [-b MODES=auto,1] "
            "[-t READ_US,LAYER_US] [-G] [-a [-w | -d MS]] [-j THREADS[,WHILE_FORECASTING]] [-s STEPS.csv] [-L] [-e lru|lfu|next-use] "
            "MODEL.gguf PROMPTS.txt [PREDICTOR_DIR]\n"
            "       %s -p TRACE [-N steps] [-W STEPS] [options] MODEL.gguf [PREDICTOR_DIR]\n", argv0, argv0);
    exit(2);
}

int main(int argc, char **argv) {
    double resident_pct = 25, read_us = 0, layer_us = 0;
    char why[160]; /* a message naming the evictions */
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int new_tokens = 32, rounds = 3, use_guard = 1, inline_forecasts = 1, wait_forecasts = 0, threads_given = 0, opt;
    int threads[2] = {cores > 1 ? (int)cores : 1, cores > 1 ? (int)cores - 1 : 1}; /* on demand, forecasting */
    long max_steps = 0;
    const char *modes_arg = "auto,1", *trace_path = NULL;
    int delay_ms = 0;
    int window = 0, by_layer = 0;
    const char *steps_path = NULL;
    Eviction eviction = EVICT_LFU;
    while ((opt = getopt(argc, argv, "r:n:R:b:t:Gwaj:p:N:d:s:W:Le:")) != -1) {
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
        case 'L': by_layer = 1; break;
        case 'e':
            if (!eviction_parse(optarg, &eviction)) {
                snprintf(why, sizeof why, "takes %s (which used expert the resident set drops first)", eviction_names());
                die("-e", why);
            }
            break;
        case 'W': {
            char *end;
            window = (int)strtol(optarg, &end, 10);
            if (*end || window < 1) window = -1;
            break;
        }
        default: usage(argv[0]);
        }
    }
    if (inline_forecasts && wait_forecasts) die("-w", "waits for the prefetcher thread's forecasts: give -a too");
    if (delay_ms && (inline_forecasts || wait_forecasts || delay_ms < 0))
        die("-d", "delays the prefetcher thread's forecasts (milliseconds, above 0): give -a, without -w");
    if (window < 0 || (window && !trace_path))
        die("-W", "takes the steps (at least 1) the modes take turns over, in a replayed trace: give -p TRACE");
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
    modes[0].budget = -1, modes[0].eviction = eviction;
    for (const char *m = modes_arg; *m; m += strcspn(m, ",") + (m[strcspn(m, ",")] == ',')) {
        char item[32];
        snprintf(item, sizeof item, "%.*s", (int)strcspn(m, ","), m);
        char *end;
        Eviction own = eviction;
        int oracle = !strcmp(item, "oracle"), on_demand = eviction_parse(item, &own);
        long b = on_demand ? -1 : oracle || !strcmp(item, "auto") ? 0 : strtol(item, &end, 10);
        if (!on_demand && strcmp(item, "auto") && !oracle && (end == item || *end || b < 1 || b > MAX_K)) {
            snprintf(why, sizeof why, "takes a comma list of auto, oracle, expert counts and on-demand evictions (%s)",
                     eviction_names());
            die("-b", why);
        }
        if (n_modes == MAX_MODES) die("-b", "names more modes than the harness runs at once");
        if (oracle && !trace_path) die("-b", "`oracle` forecasts from a replayed trace: give -p TRACE");
        if (!on_demand && !oracle && !pred_dir) continue; /* forecasts need a predictor */
        modes[n_modes].oracle = oracle;
        modes[n_modes].eviction = own;
        modes[n_modes].own_eviction = on_demand;
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
        for (int mode = 1; mode < n_modes; mode++) learned |= modes[mode].budget >= 0 && !modes[mode].oracle;
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

    uint16_t *prefill_ids = calloc((size_t)512 * ex.n_moe * ex.top_k, sizeof(uint16_t));
    float *input = input_dim ? calloc(input_dim, sizeof(float)) : NULL;
    static Bench bench;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = (uint32_t)n_ctx;
    cp.n_threads = cp.n_threads_batch = threads[0];
    cp.cb_eval = harness_callback;
    cp.cb_eval_user_data = &bench.active;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) die(model_path, "llama.cpp could not create a context");
    struct llama_batch batch = llama_batch_init(n_ctx, 0, 1);
    bench = (Bench){.ex = &ex, .capacity = capacity, .total = total, .use_guard = use_guard,
                    .inline_forecasts = inline_forecasts, .wait_forecasts = wait_forecasts, .delay_ms = delay_ms,
                    .n_ctx = n_ctx, .threads = {threads[0], threads[1]}, .read_us = read_us, .layer_us = layer_us,
                    .pred = pred, .pred_dir = pred_dir, .model_path = model_path, .trace_path = trace_path,
                    .horizon = horizon, .input_dim = input_dim, .prefill_ids = prefill_ids,
                    .input = input, .trace = trace, .ctx = ctx, .batch = batch};

    printf("%s: %d of %d experts resident (%.0f%%), %zu bytes per expert, llama.cpp threads %d (%d while forecasting), "
           "forecasts %s, %s eviction, ", model_path, capacity, total, resident_pct, ex.size[0][0] * 3, threads[0], threads[1],
           inline_forecasts ? "on the decode thread during reads" : "on a thread of their own", eviction_name(eviction));
    if (input_dim) printf("reading router inputs (%u wide) from %s, ", input_dim, trace ? "the trace" : "llama.cpp's ffn_norm");
    if (window) printf("%d round(s), the modes taking turns every %d steps, ", rounds, window);
    else printf("%d alternating round(s), ", rounds);
    if (trace && max_steps) printf("%u sequences of %s replayed (their experts forced), up to %ld decode steps\n", n_seqs, trace_path, max_steps);
    else if (trace) printf("%u sequences of %s replayed (their experts forced)\n", n_seqs, trace_path);
    else printf("greedy, up to %d new tokens per prompt\n", new_tokens);
    if (steps_path) bench.steps_csv = step_log_open(steps_path);
    static ModeRound runs[MAX_MODES];
    WindowLog windows = {0};
    for (int round = 0; round < rounds; round++) {
        /* every second round (with -W, window) runs the modes in reverse, so a steady
         * drift in the machine's speed cancels over an even number of them */
        if (!window)
            for (int turn = 0; turn < n_modes; turn++) {
                int mode = round % 2 ? n_modes - 1 - turn : turn;
                mode_round_start(&runs[mode], &modes[mode], &bench, round);
                for (uint32_t s = 0; s < n_seqs && (!max_steps || runs[mode].steps < max_steps); s++) {
                    const uint32_t *tokens;
                    const uint16_t *experts;
                    uint32_t len = replay_length(&bench, s, &tokens, &experts);
                    replay_steps(&runs[mode], &bench, s, tokens, experts, 0, len, max_steps);
                }
                decode_prompts(&runs[mode], &bench, prompts, lens, n_prompts, new_tokens);
                mode_round_finish(&runs[mode], &modes[mode], &bench, round, rounds);
            }
        else {
            for (int mode = 0; mode < n_modes; mode++) mode_round_start(&runs[mode], &modes[mode], &bench, round);
            ModeRound *held = NULL; /* the mode whose resident set the page cache holds */
            for (uint32_t s = 0; s < n_seqs && (!max_steps || runs[0].steps < max_steps); s++) {
                const uint32_t *tokens;
                const uint16_t *experts;
                uint32_t len = replay_length(&bench, s, &tokens, &experts);
                for (uint32_t p0 = 0; p0 < len && (!max_steps || runs[0].steps < max_steps); p0 += (uint32_t)window) {
                    uint32_t p1 = p0 + (uint32_t)window < len ? p0 + (uint32_t)window : len;
                    window_log_grow(&windows);
                    for (int turn = 0; turn < n_modes; turn++) {
                        int mode = windows.n % 2 ? n_modes - 1 - turn : turn;
                        double before = runs[mode].decode_s;
                        hand_over(held, &runs[mode]);
                        held = &runs[mode];
                        replay_steps(held, &bench, s, tokens, experts, p0, p1, max_steps);
                        windows.seconds[mode][windows.n] = held->decode_s - before;
                    }
                    windows.n++;
                }
            }
            for (int mode = 0; mode < n_modes; mode++) mode_round_finish(&runs[mode], &modes[mode], &bench, round, rounds);
        }
        for (int mode = 0; mode < n_modes; mode++) {
            ModeTotals *mt = &modes[mode];
            double ratio = mt->round_tps / modes[0].round_tps;
            if (!round || ratio < mt->ratio_min) mt->ratio_min = ratio;
            if (!round || ratio > mt->ratio_max) mt->ratio_max = ratio;
        }
    }

    printf("%-18s %18s %10s %10s %10s %8s %9s %13s %15s %10s\n", "mode", "resident when used", "demand MB", "staged MB", "wasted MB",
           "stall s", "tokens/s", "vs on-demand", "rounds min-max", "issuing s");
    int oracle = -1;
    for (int mode = 0; mode < n_modes; mode++) {
        ModeTotals *mt = &modes[mode];
        char name[24];
        mode_name(mt, name, sizeof name);
        if (mt->oracle) oracle = mode;
        printf("%-18s %17.1f%% %10.2f %10.2f %10.2f %8.3f %9.1f %12.2fx %9.2f-%.2fx %10.3f\n", name, 100 * mt->resident / rounds,
               mt->demand / rounds / 1e6, mt->staged / rounds / 1e6, mt->wasted / rounds / 1e6, mt->stall / rounds,
               mt->tps / rounds, mt->tps / modes[0].tps, mt->ratio_min, mt->ratio_max, mt->issue / rounds);
    }
    printf("uses of experts not held but in memory or being read (dropped and read on demand; all rounds):");
    for (int mode = 0; mode < n_modes; mode++) {
        char name[24];
        mode_name(&modes[mode], name, sizeof name);
        printf("%s %s %ld", mode ? "," : "", name, modes[mode].stray_uses);
    }
    printf("\n");
    if (by_layer) print_layer_counts(modes, n_modes, ex.n_moe, rounds);
    for (int mode = 0; mode < n_modes; mode++)
        if (modes[mode].budget == 0) {
            struct mc_plan_report *p = &modes[mode].plan;
            char name[24];
            mode_name(&modes[mode], name, sizeof name);
            char rule[64] = "the link model judges";
            if (p->break_even_precision >= 0)
                snprintf(rule, sizeof rule, "link-bound: next lookup, precision > %.2f + evicted", p->break_even_precision);
            printf("planner (%s, last round): offered %llu, staged %llu, too late %llu, not worth a read %llu; read %.0f us, "
                   "layer %.0f us, %s; %llu of %llu steps without prefetch (all rounds, one guard)\n", name,
                   (unsigned long long)p->offered, (unsigned long long)p->staged, (unsigned long long)p->late,
                   (unsigned long long)p->not_worth, p->read_us, p->layer_us, rule, (unsigned long long)modes[mode].steps_off,
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
            if (mode == oracle || modes[mode].budget < 0) continue;
            mode_name(&modes[mode], name, sizeof name);
            if (gain > 0.02 * modes[0].tps) printf(" %s %.0f%%", name, 100 * (modes[mode].tps - modes[0].tps) / gain);
            else printf(" %s n/a", name);
        }
        printf("\n");
    }
    if (window) window_intervals(&windows, modes, n_modes, oracle > 0 ? oracle : -1);
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
    free(input);
    if (bench.steps_csv) step_log_close(bench.steps_csv);
    for (int m = 0; m < MAX_MODES; m++) free(windows.seconds[m]);
    return 0;
}
