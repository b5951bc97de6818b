/* Expert residency inside llama.cpp, in C: see expert_residency.h. */
#define _GNU_SOURCE
#include "expert_residency.h"

#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "gguf.h"

#define PAGE 4096

void die(const char *what, const char *why) {
    fprintf(stderr, "error: %s: %s\n", what, why);
    exit(1);
}

double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

void read_experts(const char *path, Experts *ex) {
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

static size_t expert_bytes(Residency *r, int i) {
    int l = i / r->ex->n_experts;
    return r->ex->size[l][0] + r->ex->size[l][1] + r->ex->size[l][2];
}

/* Slice j of expert i: its offset in the file, its address in llama.cpp's mapping, and
 * its length. */
static size_t slice(Residency *r, int i, int j, unsigned char **at, size_t *n) {
    int l = i / r->ex->n_experts, e = i % r->ex->n_experts;
    size_t off = r->ex->off[l][j] + (size_t)e * r->ex->size[l][j];
    *n = r->ex->size[l][j];
    *at = (unsigned char *)(r->map_lo + off - r->map_off);
    return off;
}

/* Whether all of expert i's pages are in the page cache (`all`) or any of them. */
static int pages_resident(Residency *r, int i, int all) {
    for (int j = 0; j < 3; j++) {
        size_t n;
        unsigned char *at, vec[4096];
        slice(r, i, j, &at, &n);
        size_t pages = n / PAGE;
        for (size_t done = 0; done < pages; done += sizeof vec) {
            size_t chunk = pages - done < sizeof vec ? pages - done : sizeof vec;
            if (mincore(at + done * PAGE, chunk * PAGE, vec)) die("mincore", "failed");
            for (size_t c = 0; c < chunk; c++)
                if ((vec[c] & 1) != all) return vec[c] & 1; /* one page decides */
        }
    }
    return all;
}

static int is_resident(Residency *r, int i) { return pages_resident(r, i, 1); }

static void read_expert(Residency *r, int i) {
    for (int j = 0; j < 3; j++) {
        size_t n;
        unsigned char *at;
        off_t off = (off_t)slice(r, i, j, &at, &n);
        posix_fadvise(r->fd, off, (off_t)n, POSIX_FADV_WILLNEED);
    }
}

/* Blocks until the expert's pages are in memory: each page touched through the mapping
 * (a page still being read is waited for, as llama.cpp's own access would). */
static void wait_expert(Residency *r, int i) {
    for (int j = 0; j < 3; j++) {
        size_t n;
        unsigned char *at;
        slice(r, i, j, &at, &n);
        for (size_t off = 0; off < n; off += PAGE) (void)((volatile unsigned char *)at)[off];
    }
}

/* Out of the page cache; a staged read not issued yet never will be, one being issued is
 * waited for (so an expert is never dropped before its read is queued). */
static void drop_expert(Residency *r, int i) {
    pthread_mutex_lock(&r->io_mu);
    __atomic_store_n(&r->want[i], 0, __ATOMIC_RELAXED);
    int issued = r->issued[i];
    pthread_mutex_unlock(&r->io_mu);
    if (issued && !is_resident(r, i)) r->dropped[i] = 1; /* the read may land after the drop */
    for (int j = 0; j < 3; j++) {
        size_t n;
        unsigned char *at;
        off_t off = (off_t)slice(r, i, j, &at, &n);
        madvise(at, n, MADV_DONTNEED);
        posix_fadvise(r->fd, off, (off_t)n, POSIX_FADV_DONTNEED);
    }
}

void issue_reads(Residency *r, const uint32_t *reads, int n) {
    int issued = 0;
    pthread_mutex_lock(&r->io_mu);
    double t0 = now_s();
    for (int j = 0; j < n; j++)
        if (__atomic_exchange_n(&r->want[reads[j]], 0, __ATOMIC_RELAXED)) {
            read_expert(r, (int)reads[j]);
            r->issued[reads[j]] = 1;
            __atomic_add_fetch(&r->reads_issued, 1, __ATOMIC_RELAXED);
            issued++;
        }
    double took = now_s() - t0;
    r->issue_s += took;
    pthread_mutex_unlock(&r->io_mu);
    if (issued && r->planner && r->tell_issue) { /* the decode thread's time a staged read takes */
        pthread_mutex_lock(&r->mu);
        mc_planner_read_issued(r->planner, took / issued);
        pthread_mutex_unlock(&r->mu);
    }
}

/* The held expert with the smallest age, skipping those marked in `skip` (or none). */
static int oldest(Residency *r, const uint64_t *age, const uint8_t *skip) {
    int best = -1;
    for (int i = 0; i < r->n_ids; i++)
        if (age[i] && !(skip && skip[i]) && (best < 0 || age[i] < age[best])) best = i;
    return best;
}

const char *eviction_name(Eviction e) { return e == EVICT_NEXT_USE ? "next-use" : e == EVICT_LFU ? "lfu" : "lru"; }

const char *eviction_names(void) {
    static char list[64];
    if (!list[0])
        for (Eviction e = EVICT_LRU; e <= EVICT_NEXT_USE; e++) {
            size_t n = strlen(list);
            const char *sep = e == EVICT_LRU ? "" : e == EVICT_NEXT_USE ? " or " : ", ";
            snprintf(list + n, sizeof list - n, "%s%s", sep, eviction_name(e));
        }
    return list;
}

int eviction_parse(const char *name, Eviction *out) {
    for (Eviction e = EVICT_LRU; e <= EVICT_NEXT_USE; e++)
        if (!strcmp(name, eviction_name(e))) return *out = e, 1;
    return 0;
}

/* Expert i is used (LFU): its weight, decayed to this use, plus one. The key is the log
 * of the weight undecayed to use 0, so keys compare as the weights do at any moment. */
static void count_use(Residency *r, int i) {
    double t = r->decay * (double)++r->uses_so_far;
    r->use_key[i] = log(exp(r->use_key[i] - t) + 1) + t;
}

/* Layer l routed to `ids[k]` (next-use): with `decode` the forecaster learns it (a
 * prompt's batch is not one visit, as in `moecast run`), and the layer's held experts
 * are keyed by their expected next use, as `moecast run`'s cache re-keys a layer's
 * residents at each of its visits. */
static void next_use_routed(Residency *r, int l, const int *ids, int k, int decode) {
    uint16_t routed[MAX_K * 64];
    int n = r->ex->n_experts, base = l * n;
    for (int j = 0; j < k; j++) routed[j] = (uint16_t)ids[j];
    if ((decode && mc_next_use_layer_routed(r->next_use, (uint32_t)l, routed, (uint32_t)k)) ||
        mc_next_use_layer(r->next_use, (uint32_t)l, r->due, (uint32_t)n))
        die("next-use eviction", mc_last_error());
    for (int e = 0; e < n; e++)
        if (r->used_age[base + e]) r->use_key[base + e] = -r->due[e];
}

/* The used expert `r->eviction` drops first, skipping those marked in `skip` (or none). */
static int least_valuable(Residency *r, const uint8_t *skip) {
    if (r->eviction == EVICT_LRU) return oldest(r, r->used_age, skip);
    int best = -1;
    for (int i = 0; i < r->n_ids; i++) {
        if (!r->used_age[i] || (skip && skip[i])) continue;
        if (best < 0 || r->use_key[i] < r->use_key[best] ||
            (r->use_key[i] == r->use_key[best] && r->used_age[i] < r->used_age[best]))
            best = i;
    }
    return best;
}

/* Evicts down to the capacity (see Residency): without a planner, staged experts beyond
 * their slots and used ones beyond the rest; `told`: the planner hears of a used expert a
 * staged read evicts. */
static void evict(Residency *r, int told) {
    for (;;) {
        int v;
        if (!r->planner && r->n_staged > r->slots) { /* the oldest staged out of its slots */
            v = oldest(r, r->staged_age, NULL);
            r->staged_age[v] = 0, r->n_staged--;
            r->bytes_wasted += expert_bytes(r, v);
        } else if (!r->planner) {
            if (r->n_used <= r->capacity - r->slots || (v = least_valuable(r, r->keep)) < 0) return;
            r->used_age[v] = 0, r->n_used--;
        } else if (r->n_used + r->n_staged + r->n_stale <= r->capacity) {
            return;
        } else if ((v = oldest(r, r->stale_age, NULL)) >= 0) {
            r->stale_age[v] = 0, r->n_stale--;
            r->bytes_wasted += expert_bytes(r, v);
        } else if ((v = least_valuable(r, r->keep)) >= 0) {
            r->used_age[v] = 0, r->n_used--;
            if (told) mc_planner_evicted(r->planner, (uint32_t)v);
        } else if ((v = oldest(r, r->staged_age, r->keep)) >= 0) {
            r->staged_age[v] = 0, r->n_staged--, r->landed[v] = 0;
            r->bytes_wasted += expert_bytes(r, v);
        } else {
            return;
        }
        drop_expert(r, v);
    }
}

/* Whether the set holds expert i: used, staged or stale. */
static int holds(Residency *r, int i) { return r->used_age[i] || r->staged_age[i] || r->stale_age[i]; }

/* Staged reads not landed yet. */
static int in_flight(Residency *r) {
    int n = 0;
    for (int i = 0; i < r->n_ids; i++)
        if (r->staged_age[i] && !r->landed[i]) {
            if (is_resident(r, i)) r->landed[i] = 1;
            else n++;
        }
    return n;
}

void use_experts(Residency *r, int l, const int *ids, int k, int decode, int count, void (*meanwhile)(void *),
                 void *arg) {
    int resident[MAX_K * 64];
    uint16_t routed[MAX_K];
    int base = l * r->ex->n_experts, missing = 0, demand = 0, late = 0, stray = 0;
    /* what the routing decides, at once: the prefetcher plans the next layers meanwhile */
    pthread_mutex_lock(&r->mu);
    int busy = r->planner && count ? in_flight(r) : 0;
    uint64_t issued = __atomic_load_n(&r->reads_issued, __ATOMIC_RELAXED);
    memset(r->keep, 0, (size_t)r->n_ids);
    for (int j = 0; j < k; j++) {
        int i = base + ids[j], staged = r->staged_age[i] || r->stale_age[i];
        /* an expert the set does not hold is not resident, whatever the page cache says:
         * a staged read evicted while in flight can land after its drop (which does not
         * take pages still being read); such a stray is dropped again and read on demand
         * (counted in stray_uses, its read not timed) */
        if (!holds(r, i) && (r->dropped[i] || pages_resident(r, i, 0))) {
            drop_expert(r, i);
            stray = 1;
            if (count) r->stray_uses++;
        }
        r->dropped[i] = 0;
        resident[j] = holds(r, i) && is_resident(r, i);
        missing += !resident[j];
        late |= !resident[j] && staged;
        demand += !resident[j] && !staged;
        if (r->staged_age[i]) r->staged_age[i] = 0, r->n_staged--;
        if (r->stale_age[i]) r->stale_age[i] = 0, r->n_stale--;
        r->landed[i] = 0, r->keep[i] = 1;
        if (!r->used_age[i]) r->n_used++;
        r->used_age[i] = ++r->clock;
        if (r->eviction == EVICT_LFU) count_use(r, i);
        if (count) {
            r->uses++;
            if (resident[j]) r->resident_uses++;
            else if (staged) r->late++;
            else r->bytes_demand += expert_bytes(r, i), r->layer_demand[l]++;
            if (staged) r->layer_staged_used[l]++;
        }
    }
    if (r->next_use) next_use_routed(r, l, ids, k, decode);
    if (r->planner) {
        for (int e = 0; e < r->ex->n_experts; e++) /* its layer routed without it */
            if (r->staged_age[base + e]) {
                r->stale_age[base + e] = r->staged_age[base + e], r->n_stale++;
                r->staged_age[base + e] = 0, r->n_staged--, r->landed[base + e] = 0;
            }
        if (decode) { /* a replay's first step is not timed, but its routing is known */
            r->next_layer = l + 1;
            for (int j = 0; j < k && j < MAX_K; j++) routed[j] = (uint16_t)ids[j];
            mc_planner_layer_routed(r->planner, (uint32_t)l, routed, (uint32_t)k, (uint32_t)demand);
        }
    }
    evict(r, 0);
    pthread_mutex_unlock(&r->mu);
    /* the missing experts, read whole and waited for without the lock */
    double t0 = now_s(); /* the request blocks while the device's queue is full */
    for (int j = 0; j < k; j++)
        if (!resident[j]) read_expert(r, base + ids[j]);
    /* the forecast's time is work, not a stall (the table's stall column), but not the
     * layer's compute either (the planner is told it with the reads); reads that all
     * landed during it took an unknown part of it, so they are not timed */
    double t1 = t0;
    int timed = 1;
    if (missing && meanwhile) {
        meanwhile(arg);
        t1 = now_s(), timed = 0;
        for (int j = 0; j < k; j++) timed |= !resident[j] && !is_resident(r, base + ids[j]);
    }
    for (int j = 0; j < k; j++)
        if (!resident[j]) wait_expert(r, base + ids[j]);
    double done = now_s(), read_s = missing ? done - t0 : 0, waited = missing ? done - t1 : 0;
    pthread_mutex_lock(&r->mu);
    if (count) r->stall_s += waited;
    if (count && r->planner) {
        /* the link held these reads alone: no staged read in flight or issued meanwhile */
        if (demand && timed && !busy && !late && !stray && __atomic_load_n(&r->reads_issued, __ATOMIC_RELAXED) == issued) {
            for (int j = 0; j < demand; j++) mc_planner_read_done(r->planner, read_s / demand);
            r->measured = 1;
        }
        if (read_s > 0) mc_planner_stalled(r->planner, read_s); /* the forecast meanwhile included */
    }
    pthread_mutex_unlock(&r->mu);
}

/* Marks expert i staged and its read to be issued. */
static void mark_staged(Residency *r, int i, uint32_t *reads, int *n_reads) {
    __atomic_store_n(&r->want[i], 1, __ATOMIC_RELAXED);
    reads[(*n_reads)++] = (uint32_t)i;
    r->staged_age[i] = ++r->clock, r->n_staged++, r->landed[i] = 0;
    r->staged++;
    r->layer_staged[i / r->ex->n_experts]++;
    r->bytes_staged += expert_bytes(r, i);
}

void stage_expert(Residency *r, int l, int e, uint32_t *reads, int *n_reads) {
    int i = l * r->ex->n_experts + e;
    if (r->used_age[i] || r->staged_age[i]) return;
    mark_staged(r, i, reads, n_reads);
    evict(r, 0);
}

int offer_forecast(Residency *r, int l, const uint16_t *ranking, int n, uint32_t *reads, int *n_reads) {
    uint16_t rank[MAX_K];
    uint8_t held[MAX_K];
    int m = 0, base = l * r->ex->n_experts;
    if (!r->measured) return MC_OK;
    for (int j = 0; j < n && m < MAX_K; j++)
        if (ranking[j] != 0xFFFF) {
            int i = base + ranking[j];
            rank[m] = ranking[j], held[m++] = holds(r, i);
        }
    int pending = r->n_staged, free = r->capacity - r->n_used - pending - r->n_stale, room = r->capacity - r->ex->top_k - pending;
    uint32_t n_out = 0;
    /* the staged reads on the link; the layer's own demand reads are in the planner's
     * estimate of the next lookup already (its period includes their stall) */
    int queued = in_flight(r);
    int rc = mc_planner_plan(r->planner, (uint32_t)l, rank, NULL, held, (uint32_t)m, (uint32_t)queued,
                             (uint32_t)(free > 0 ? free : 0), r->plan_out, (uint32_t)(room > 0 ? room : 0), &n_out);
    if (rc) return rc;
    for (uint32_t j = 0; j < n_out; j++) {
        int i = (int)r->plan_out[j];
        if (r->used_age[i] || r->staged_age[i]) continue; /* an earlier forecast, resident by now */
        if (r->stale_age[i]) { /* still in memory: staged again, not read */
            r->staged_age[i] = r->stale_age[i], r->stale_age[i] = 0, r->n_stale--, r->n_staged++;
            continue;
        }
        mark_staged(r, i, reads, n_reads);
        int kept = r->keep[i];
        r->keep[i] = 1;
        evict(r, 1);
        r->keep[i] = (uint8_t)kept;
    }
    return MC_OK;
}

void residency_settle(Residency *r) {
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->n_ids; i++) {
        pthread_mutex_lock(&r->io_mu);
        int issued = r->issued[i];
        r->issued[i] = 0;
        pthread_mutex_unlock(&r->io_mu);
        if (issued && !holds(r, i) && (r->dropped[i] || pages_resident(r, i, 0))) { /* landed, or still being read */
            wait_expert(r, i);
            drop_expert(r, i);
        }
        r->dropped[i] = 0;
        if (holds(r, i)) wait_expert(r, i);
    }
    pthread_mutex_unlock(&r->mu);
}

void residency_restore(Residency *r) {
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < r->n_ids; i++) {
        if (!holds(r, i) && pages_resident(r, i, 0)) drop_expert(r, i);
        else if (holds(r, i) && !is_resident(r, i)) read_expert(r, i);
    }
    for (int i = 0; i < r->n_ids; i++)
        if (holds(r, i)) wait_expert(r, i);
    pthread_mutex_unlock(&r->mu);
}

void residency_finish(Residency *r) {
    for (int i = 0; i < r->n_ids; i++)
        if (r->staged_age[i] || r->stale_age[i]) r->bytes_wasted += expert_bytes(r, i);
}

void residency_init(Residency *r, Experts *ex, int capacity, int slots, Eviction eviction, struct mc_planner *planner,
                    int measured) {
    memset(r, 0, sizeof *r);
    r->eviction = eviction;
    r->decay = log(2.0) / (LFU_HALF_LIFE * (double)ex->n_moe * ex->top_k);
    r->ex = ex;
    r->capacity = capacity;
    r->slots = slots;
    r->planner = planner;
    r->measured = measured;
    pthread_mutex_init(&r->mu, NULL);
    pthread_mutex_init(&r->io_mu, NULL);
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
    r->n_ids = ex->n_moe * ex->n_experts;
    size_t n = (size_t)r->n_ids;
    r->used_age = calloc(n, sizeof(uint64_t));
    r->staged_age = calloc(n, sizeof(uint64_t));
    r->stale_age = calloc(n, sizeof(uint64_t));
    r->use_key = malloc(n * sizeof(double));
    r->landed = calloc(n, 1), r->keep = calloc(n, 1), r->want = calloc(n, 1), r->issued = calloc(n, 1);
    r->dropped = calloc(n, 1);
    r->plan_out = calloc(n, sizeof(uint32_t));
    if (!r->used_age || !r->staged_age || !r->stale_age || !r->use_key || !r->landed || !r->keep || !r->want || !r->issued || !r->dropped ||
        !r->plan_out)
        die("residency", "out of memory");
    for (int i = 0; i < r->n_ids; i++) r->use_key[i] = -INFINITY; /* never used: weight 0 */
    if (eviction == EVICT_NEXT_USE) {
        r->due = malloc((size_t)ex->n_experts * sizeof(double));
        if (!r->due) die("residency", "out of memory");
        if (mc_next_use_new((uint32_t)ex->n_moe, (uint32_t)ex->n_experts, &r->next_use))
            die("next-use eviction", mc_last_error());
    }
    for (int i = 0; i < r->n_ids; i++)
        if (is_resident(r, i)) die(ex->path, "experts stay in memory after the drop (a tmpfs, or another process using the file?)");
}

void residency_free(Residency *r) {
    close(r->fd);
    free(r->used_age), free(r->staged_age), free(r->stale_age), free(r->use_key), free(r->due);
    mc_next_use_free(r->next_use);
    free(r->landed), free(r->keep), free(r->want), free(r->issued), free(r->dropped), free(r->plan_out);
    pthread_mutex_destroy(&r->mu);
    pthread_mutex_destroy(&r->io_mu);
}
