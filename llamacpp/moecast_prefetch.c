/* moecast's predictor inside llama.cpp, in C: the prefetch harness of
 * moecast_llamacpp.py (see docs/guide.md#llamacpp) without Python in the eval callback.
 *
 *   moecast_prefetch MODEL.gguf PROMPTS.txt [PREDICTOR_DIR] [resident%=25] [new_tokens=32] [rounds=3] [wait=0]
 *
 * Greedy decoding of every prompt (one per line), on demand and, with a predictor (an
 * ids-only moecast predictor, through libmoecast's C ABI), with the forecast experts
 * staged. The predictor runs on a thread of its own that owns the session: the eval
 * callback only queues "layers 0..l routed" and returns, so forecasts overlap
 * llama.cpp's compute on the second core (a forecast is dropped when two wait). llama.cpp memory-maps the GGUF; the page cache is the fast memory, a set of
 * `resident%` of the experts is kept (least recently used out), staged experts wait in
 * slots of their own (2 x 1 per layer, one layer ahead), residency is read with mincore
 * when a layer routes (before its experts run), missing experts are read whole. Prints
 * one line per mode: resident when used, MB read on demand, MB staged, tokens/s. With
 * wait=1 the callback waits for each forecast instead (none dropped or late, whatever
 * the machine's speed: what is staged depends on the predictor alone; tests).
 * Linux only. Build: make llamacpp-c (links the wheel's libllama and libmoecast). */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ggml-backend.h"
#include "ggml.h"
#include "gguf.h"
#include "llama.h"
#include "moecast.h"

#define MAX_LAYERS 256
#define MAX_K 64
#define PAGE 4096

static void die(const char *what, const char *why) {
    fprintf(stderr, "error: %s: %s\n", what, why);
    exit(1);
}

/* ---- the GGUF's experts: byte ranges of each expert's three slices ---- */
typedef struct {
    int n_moe, n_experts, top_k;
    size_t off[MAX_LAYERS][3], size[MAX_LAYERS][3]; /* per layer: slice of expert 0, bytes per expert */
    char path[4096];
} Experts;

static void read_experts(const char *path, Experts *ex) {
    struct gguf_init_params p = {.no_alloc = true, .ctx = NULL};
    struct gguf_context *g = gguf_init_from_file(path, p);
    if (!g) die(path, "not a readable GGUF file");
    int64_t a = gguf_find_key(g, "general.architecture");
    if (a < 0) die(path, "no general.architecture");
    const char *arch = gguf_get_val_str(g, a);
    char key[256];
    snprintf(key, sizeof key, "%s.expert_count", arch);
    int64_t ke = gguf_find_key(g, key);
    snprintf(key, sizeof key, "%s.expert_used_count", arch);
    int64_t kk = gguf_find_key(g, key);
    if (ke < 0 || kk < 0) die(path, "not an MoE model (no expert_count / expert_used_count)");
    ex->n_experts = (int)gguf_get_val_u32(g, ke);
    ex->top_k = (int)gguf_get_val_u32(g, kk);
    if (ex->top_k > MAX_K) die(path, "top-k too large");
    const char *parts[3] = {"gate", "up", "down"};
    ex->n_moe = 0;
    for (int l = 0; l < MAX_LAYERS; l++) {
        char name[128];
        snprintf(name, sizeof name, "blk.%d.ffn_gate_exps.weight", l);
        if (gguf_find_tensor(g, name) < 0) break;
        for (int j = 0; j < 3; j++) {
            snprintf(name, sizeof name, "blk.%d.ffn_%s_exps.weight", l, parts[j]);
            int64_t t = gguf_find_tensor(g, name);
            if (t < 0) die(path, "an expert tensor is missing");
            size_t per = gguf_get_tensor_size(g, t) / ex->n_experts;
            size_t off = gguf_get_data_offset(g) + gguf_get_tensor_offset(g, t);
            if (off % PAGE || per % PAGE) die(path, "expert slices are not page-aligned (export with llamacpp/export_gguf.py)");
            ex->off[l][j] = off;
            ex->size[l][j] = per;
        }
        ex->n_moe++;
    }
    gguf_free(g);
    if (!realpath(path, ex->path)) die(path, "cannot resolve the path");
}

/* ---- residency: llama.cpp's mapping of the file, LRU of used experts, staging slots ---- */
typedef struct {
    Experts *ex;
    int fd, capacity, slots;
    uintptr_t map_lo;
    size_t map_off, map_len;
    /* ages: 0 = not held; else last use (used set) or staging time (staging slots) */
    uint64_t *used_age, *staged_age, clock;
    int n_used, n_staged;
    long uses, resident_uses, late;
    double bytes_demand, bytes_staged;
} Residency;

static size_t expert_bytes(Residency *r, int l) { return r->ex->size[l][0] + r->ex->size[l][1] + r->ex->size[l][2]; }

static int is_resident(Residency *r, int l, int e) {
    for (int j = 0; j < 3; j++) {
        size_t off = r->ex->off[l][j] + (size_t)e * r->ex->size[l][j], n = r->ex->size[l][j];
        unsigned char vec[4096];
        size_t pages = n / PAGE;
        for (size_t done = 0; done < pages; done += sizeof vec) {
            size_t chunk = pages - done < sizeof vec ? pages - done : sizeof vec;
            if (mincore((void *)(r->map_lo + off - r->map_off + done * PAGE), chunk * PAGE, vec)) die("mincore", "failed");
            for (size_t i = 0; i < chunk; i++)
                if (!(vec[i] & 1)) return 0;
        }
    }
    return 1;
}

static void read_expert(Residency *r, int l, int e) {
    for (int j = 0; j < 3; j++)
        posix_fadvise(r->fd, (off_t)(r->ex->off[l][j] + (size_t)e * r->ex->size[l][j]), (off_t)r->ex->size[l][j],
                      POSIX_FADV_WILLNEED);
}

static void drop_expert(Residency *r, int l, int e) {
    for (int j = 0; j < 3; j++) {
        size_t off = r->ex->off[l][j] + (size_t)e * r->ex->size[l][j], n = r->ex->size[l][j];
        madvise((void *)(r->map_lo + off - r->map_off), n, MADV_DONTNEED);
        posix_fadvise(r->fd, (off_t)off, (off_t)n, POSIX_FADV_DONTNEED);
    }
}

/* The held expert (used or staged) with the smallest age, skipping layer `keep_l`'s `keep`. */
static int oldest(Residency *r, uint64_t *age, int keep_l, const int *keep, int nk) {
    int best = -1;
    for (int i = 0; i < r->ex->n_moe * r->ex->n_experts; i++) {
        if (!age[i]) continue;
        int skip = 0;
        for (int j = 0; j < nk; j++) skip |= i == keep_l * r->ex->n_experts + keep[j];
        if (!skip && (best < 0 || age[i] < age[best])) best = i;
    }
    return best;
}

static void use_experts(Residency *r, int l, const int *ids, int k, int count) {
    for (int j = 0; j < k; j++) {
        int i = l * r->ex->n_experts + ids[j];
        int resident = is_resident(r, l, ids[j]);
        if (!resident) read_expert(r, l, ids[j]);
        int staged = r->staged_age[i] != 0;
        if (staged) { r->staged_age[i] = 0; r->n_staged--; }
        if (!r->used_age[i]) r->n_used++;
        r->used_age[i] = ++r->clock;
        if (count) {
            r->uses++;
            if (resident) r->resident_uses++;
            else if (staged) r->late++;
            else r->bytes_demand += expert_bytes(r, l);
        }
    }
    while (r->n_used > r->capacity - r->slots) {
        int v = oldest(r, r->used_age, l, ids, k);
        if (v < 0) break;
        r->used_age[v] = 0;
        r->n_used--;
        drop_expert(r, v / r->ex->n_experts, v % r->ex->n_experts);
    }
}

static void stage_expert(Residency *r, int l, int e) {
    int i = l * r->ex->n_experts + e;
    if (r->used_age[i] || r->staged_age[i]) return;
    read_expert(r, l, e);
    r->staged_age[i] = ++r->clock;
    r->n_staged++;
    r->bytes_staged += expert_bytes(r, l);
    while (r->n_staged > r->slots) {
        int v = oldest(r, r->staged_age, -1, NULL, 0);
        r->staged_age[v] = 0;
        r->n_staged--;
        drop_expert(r, v / r->ex->n_experts, v % r->ex->n_experts);
    }
}

static void residency_init(Residency *r, Experts *ex, int capacity, int slots) {
    memset(r, 0, sizeof *r);
    r->ex = ex;
    r->capacity = capacity;
    r->slots = slots;
    r->fd = open(ex->path, O_RDONLY);
    if (r->fd < 0) die(ex->path, "cannot open");
    FILE *maps = fopen("/proc/self/maps", "r");
    char line[8192];
    while (maps && fgets(line, sizeof line, maps)) {
        unsigned long lo, hi, off;
        char perms[8], dev[16], file[4096] = "";
        unsigned long inode;
        if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %4095s", &lo, &hi, perms, &off, dev, &inode, file) == 7 &&
            !strcmp(file, ex->path)) {
            r->map_lo = lo, r->map_off = off, r->map_len = hi - lo;
            break;
        }
    }
    if (maps) fclose(maps);
    if (!r->map_lo) die(ex->path, "llama.cpp has not memory-mapped the file");
    /* a fault reads only its own page (see docs/guide.md#llamacpp) */
    madvise((void *)r->map_lo, r->map_len, MADV_RANDOM);
    madvise((void *)r->map_lo, r->map_len, MADV_NOHUGEPAGE);
    madvise((void *)r->map_lo, r->map_len, MADV_DONTNEED);
    posix_fadvise(r->fd, 0, 0, POSIX_FADV_DONTNEED);
    size_t n = (size_t)ex->n_moe * ex->n_experts;
    r->used_age = calloc(n, sizeof(uint64_t));
    r->staged_age = calloc(n, sizeof(uint64_t));
    for (int l = 0; l < ex->n_moe; l++)
        for (int e = 0; e < ex->n_experts; e++)
            if (is_resident(r, l, e)) die(ex->path, "experts stay in memory after the drop (a tmpfs?)");
}

/* ---- the prefetcher: a thread that owns the predictor session, so its forecasts run on
 * the second core while llama.cpp computes, and stages what they name ---- */
enum { JOB_RESET, JOB_OBSERVE, JOB_NEXT, JOB_AHEAD };
typedef struct {
    int type, known;
    uint32_t token;
    uint16_t routed[MAX_LAYERS * MAX_K];
} Job;
#define RING 256
typedef struct {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work, idle;
    Job ring[RING];
    int head, count, busy, stop, error;
    char message[512]; /* mc_last_error() is per thread: the worker's, kept for main */
    struct mc_session *session;
    Residency *res;
    pthread_mutex_t *res_mu;
} Prefetcher;

static void run_job(Prefetcher *w, const Job *j) {
    uint16_t ahead[MAX_LAYERS];
    int n_moe = w->res->ex->n_moe, rc = 0, layer = -1;
    switch (j->type) {
    case JOB_RESET: rc = mc_session_reset(w->session); break;
    case JOB_OBSERVE: rc = mc_session_observe(w->session, j->token, j->routed); break;
    case JOB_NEXT: rc = mc_session_predict_next(w->session, j->token, 1, ahead), layer = 0; break;
    case JOB_AHEAD: rc = mc_session_predict_lookahead(w->session, j->token, (uint32_t)j->known, j->routed, 1, ahead), layer = j->known; break;
    }
    if (rc) {
        if (!w->error) snprintf(w->message, sizeof w->message, "%s", mc_last_error());
        w->error = 1;
        return;
    }
    if (layer >= 0 && layer < n_moe && ahead[0] != 0xFFFF) {
        pthread_mutex_lock(w->res_mu);
        stage_expert(w->res, layer, ahead[0]);
        pthread_mutex_unlock(w->res_mu);
    }
}

static void *worker_main(void *arg) {
    Prefetcher *w = arg;
    static Job job;
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->count && !w->stop) pthread_cond_wait(&w->work, &w->mu);
        if (!w->count) break;
        job = w->ring[w->head];
        w->head = (w->head + 1) % RING, w->count--, w->busy = 1;
        pthread_mutex_unlock(&w->mu);
        run_job(w, &job);
        pthread_mutex_lock(&w->mu);
        w->busy = 0;
        pthread_cond_broadcast(&w->idle);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

/* Queues a job; a forecast is dropped when two jobs already wait (it would land late). */
static void post(Prefetcher *w, int type, uint32_t token, int known, const uint16_t *routed, int n) {
    pthread_mutex_lock(&w->mu);
    if ((type == JOB_NEXT || type == JOB_AHEAD) && w->count >= 2) { pthread_mutex_unlock(&w->mu); return; }
    while (w->count == RING) pthread_cond_wait(&w->idle, &w->mu);
    Job *j = &w->ring[(w->head + w->count) % RING];
    j->type = type, j->token = token, j->known = known;
    if (n) memcpy(j->routed, routed, (size_t)n * sizeof(uint16_t));
    w->count++;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
}

static void flush(Prefetcher *w) {
    pthread_mutex_lock(&w->mu);
    while (w->count || w->busy) pthread_cond_wait(&w->idle, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

/* wait=1: every forecast is waited for where it is posted. */
static int wait_forecasts;

static void forecast(Prefetcher *w, int type, uint32_t token, int known, const uint16_t *routed, int n) {
    if (wait_forecasts) flush(w);
    post(w, type, token, known, routed, n);
    if (wait_forecasts) flush(w);
}

/* ---- the eval callback ---- */
typedef struct {
    Residency *res;
    Prefetcher *session; /* NULL: on demand */
    pthread_mutex_t res_mu;
    uint32_t token;
    int prefill, count, known;
    uint16_t routed[MAX_LAYERS * MAX_K];
    uint16_t *prefill_ids; /* [row][layer][k] of the prompt's batch, for the session */
    int prefill_rows;
    int error;
} Harness;

static bool callback(struct ggml_tensor *t, bool ask, void *user) {
    Harness *h = user;
    const char *name = ggml_get_name(t);
    int layer;
    if (strncmp(name, "ffn_moe_topk-", 13) || sscanf(name + 13, "%d", &layer) != 1) return !ask;
    if (ask) return true;
    Experts *ex = h->res->ex;
    int k = (int)t->ne[0], n = (int)t->ne[1];
    if (t->type != GGML_TYPE_I32 || k != ex->top_k || layer >= ex->n_moe) { h->error = 1; return true; }
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
        int use[MAX_K];
        for (int j = 0; j < k; j++) use[j] = ids[j], h->routed[layer * k + j] = (uint16_t)ids[j];
        pthread_mutex_lock(&h->res_mu);
        use_experts(h->res, layer, use, k, h->count);
        pthread_mutex_unlock(&h->res_mu);
        h->known = layer + 1;
        if (h->session && layer + 1 < ex->n_moe)
            forecast(h->session, JOB_AHEAD, h->token, layer + 1, h->routed, (layer + 1) * k);
    }
    if (h->prefill) {
        pthread_mutex_lock(&h->res_mu);
        use_experts(h->res, layer, seen, n_seen, 0);
        pthread_mutex_unlock(&h->res_mu);
    }
    return true;
}

static void quiet(enum ggml_log_level level, const char *text, void *user) {
    (void)user;
    if (level == GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf PROMPTS.txt [PREDICTOR_DIR|-] [resident%%=25] [new_tokens=32] [rounds=3] [wait=0]\n", argv[0]);
        return 2;
    }
    const char *model_path = argv[1], *prompts_path = argv[2];
    const char *pred_dir = argc > 3 && strcmp(argv[3], "-") ? argv[3] : NULL;
    double resident_pct = argc > 4 ? atof(argv[4]) : 25;
    int new_tokens = argc > 5 ? atoi(argv[5]) : 32, rounds = argc > 6 ? atoi(argv[6]) : 3;
    wait_forecasts = argc > 7 && !strcmp(argv[7], "1");
    if (!(resident_pct > 0 && resident_pct <= 100) || new_tokens < 1 || rounds < 1) die("arguments", "resident% in (0, 100], new_tokens and rounds >= 1");
    static Experts ex;
    read_experts(model_path, &ex);
    int total = ex.n_moe * ex.n_experts, capacity = (int)(resident_pct / 100 * total + 0.5);
    if (capacity < ex.top_k + 1) die("resident", "too small for a layer's top-k and a staging slot");
    int slots = 2 < capacity - ex.top_k ? 2 : capacity - ex.top_k;

    struct mc_predictor *pred = NULL;
    if (pred_dir) {
        uint32_t m, e, k, hz, dim = 0;
        if (mc_predictor_open(pred_dir, &pred) || mc_predictor_shape(pred, &m, &e, &k, &hz)) die(pred_dir, mc_last_error());
        mc_predictor_router_input_dim(pred, &dim);
        if ((int)m != ex.n_moe || (int)e != ex.n_experts || (int)k != ex.top_k) die(pred_dir, "predictor shape does not match the model");
        if (dim) die(pred_dir, "this harness takes ids-only predictors (trained without --features hidden)");
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
    int n_ctx = llama_model_n_ctx_train(model) < 4096 ? llama_model_n_ctx_train(model) : 4096;

    /* prompts, tokenized by llama.cpp */
    FILE *pf = fopen(prompts_path, "r");
    if (!pf) die(prompts_path, "cannot open");
    static llama_token prompts[1024][512];
    int lens[1024], n_prompts = 0;
    char line[65536], where[4200];
    for (int lineno = 1; n_prompts < 1024 && fgets(line, sizeof line, pf); lineno++) {
        line[strcspn(line, "\n")] = 0;
        if (!line[0]) continue;
        int n = llama_tokenize(vocab, line, (int)strlen(line), prompts[n_prompts], 512, false, true);
        snprintf(where, sizeof where, "%s:%d", prompts_path, lineno);
        if (n <= 0 || n + new_tokens > n_ctx) die(where, "the prompt has no tokens or, with new_tokens, exceeds the context (512 tokens at most)");
        lens[n_prompts++] = n;
    }
    fclose(pf);

    static Harness h;
    uint16_t *prefill_ids = calloc((size_t)512 * ex.n_moe * ex.top_k, sizeof(uint16_t));
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = (uint32_t)n_ctx;
    cp.n_threads = cp.n_threads_batch = 1;
    cp.cb_eval = callback;
    cp.cb_eval_user_data = &h;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) die(model_path, "llama.cpp could not create a context");
    struct llama_batch batch = llama_batch_init(n_ctx, 0, 1);
    int n_vocab = llama_vocab_n_tokens(vocab);

    printf("%s: %d of %d experts resident (%.0f%%), %zu bytes per expert, %d round(s), greedy, up to %d new tokens per prompt\n",
           model_path, capacity, total, resident_pct, ex.size[0][0] * 3, rounds, new_tokens);
    printf("%-10s %18s %10s %10s %9s\n", "mode", "resident when used", "demand MB", "staged MB", "tokens/s");
    for (int mode = 0; mode < (pred ? 2 : 1); mode++) {
        double tps_sum = 0, res_sum = 0, demand = 0, staged = 0;
        for (int round = 0; round < rounds; round++) {
            static Residency res;
            residency_init(&res, &ex, capacity, mode ? slots : 0);
            memset(&h, 0, sizeof h);
            h.res = &res;
            h.prefill_ids = prefill_ids;
            pthread_mutex_init(&h.res_mu, NULL);
            static Prefetcher w;
            if (mode) {
                memset(&w, 0, sizeof w);
                if (mc_session_new(pred, &w.session)) die(pred_dir, mc_last_error());
                w.res = &res, w.res_mu = &h.res_mu;
                pthread_mutex_init(&w.mu, NULL);
                pthread_cond_init(&w.work, NULL);
                pthread_cond_init(&w.idle, NULL);
                if (pthread_create(&w.thread, NULL, worker_main, &w)) die("prefetcher", "cannot start its thread");
                h.session = &w;
            }
            double decode_s = 0;
            long steps = 0;
            for (int p = 0; p < n_prompts; p++) {
                llama_memory_clear(llama_get_memory(ctx), true);
                if (h.session) post(h.session, JOB_RESET, 0, 0, NULL, 0);
                batch.n_tokens = lens[p];
                for (int i = 0; i < lens[p]; i++) {
                    batch.token[i] = prompts[p][i], batch.pos[i] = i, batch.n_seq_id[i] = 1;
                    batch.seq_id[i][0] = 0, batch.logits[i] = 1; /* every row: the last layer routes them all */
                }
                h.prefill = 1, h.count = 0, h.prefill_rows = lens[p];
                if (llama_decode(ctx, batch)) die(model_path, "llama_decode failed");
                h.prefill = 0;
                for (int i = 0; h.session && i < lens[p]; i++)
                    post(h.session, JOB_OBSERVE, (uint32_t)prompts[p][i], 0, h.prefill_ids + (size_t)i * ex.n_moe * ex.top_k,
                         ex.n_moe * ex.top_k);
                int pos = lens[p];
                for (int step = 0; step < new_tokens - 1 && pos < n_ctx; step++) {
                    const float *logits = llama_get_logits_ith(ctx, -1);
                    llama_token next = 0;
                    for (int v = 1; v < n_vocab; v++)
                        if (logits[v] > logits[next]) next = v;
                    if (llama_vocab_is_eog(vocab, next)) break;
                    double t0 = now();
                    h.token = (uint32_t)next, h.count = 1, h.known = 0;
                    if (h.session) forecast(h.session, JOB_NEXT, h.token, 0, NULL, 0);
                    batch.n_tokens = 1;
                    batch.token[0] = next, batch.pos[0] = pos++, batch.n_seq_id[0] = 1, batch.seq_id[0][0] = 0, batch.logits[0] = 1;
                    if (llama_decode(ctx, batch) || h.error) die(model_path, "decode or eval callback failed");
                    if (h.session && h.known == ex.n_moe)
                        post(h.session, JOB_OBSERVE, h.token, 0, h.routed, ex.n_moe * ex.top_k);
                    decode_s += now() - t0;
                    steps++;
                }
            }
            if (h.session) {
                flush(&w);
                pthread_mutex_lock(&w.mu);
                w.stop = 1;
                pthread_cond_signal(&w.work);
                pthread_mutex_unlock(&w.mu);
                pthread_join(w.thread, NULL);
                if (w.error) die(pred_dir, w.message);
                mc_session_free(w.session);
            }
            close(res.fd);
            free(res.used_age);
            free(res.staged_age);
            tps_sum += steps / decode_s;
            res_sum += (double)res.resident_uses / (res.uses ? res.uses : 1);
            demand += res.bytes_demand, staged += res.bytes_staged;
        }
        printf("%-10s %17.1f%% %10.2f %10.2f %9.1f\n", mode ? "predictor" : "on-demand", 100 * res_sum / rounds,
               demand / rounds / 1e6, staged / rounds / 1e6, tps_sum / rounds);
    }
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    if (pred) mc_predictor_free(pred);
    free(prefill_ids);
    return 0;
}
