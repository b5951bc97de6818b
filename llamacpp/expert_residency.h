/* Expert residency inside llama.cpp, in C (moecast_prefetch.c; expert_residency.py is the
 * Python harness's): which experts' byte ranges of the memory-mapped GGUF are in the page
 * cache, a bounded resident set, and staging, by a fixed budget in slots of its own or by
 * moecast's planner (mc_planner_*) in the resident set itself. Linux only. */
#ifndef MOECAST_EXPERT_RESIDENCY_H
#define MOECAST_EXPERT_RESIDENCY_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "moecast.h"

#define MAX_LAYERS 256
#define MAX_K 64

/* Prints "error: what: why" and exits. */
void die(const char *what, const char *why);

/* Monotonic seconds. */
double now_s(void);

/* The GGUF's experts: byte ranges of each expert's three slices. */
typedef struct {
    int n_moe, n_experts, top_k;
    size_t off[MAX_LAYERS][3], size[MAX_LAYERS][3]; /* per layer: slice of expert 0, bytes per expert */
    char path[4096];
} Experts;

/* Reads the expert layout of a GGUF written by llamacpp/export_gguf.py (page-aligned). */
void read_experts(const char *path, Experts *ex);

/* Which used expert the resident set drops first: the least recently used; the least
 * frequently used, each use's weight halving every LFU_HALF_LIFE tokens' worth of uses
 * (n_moe x top_k each; the least recent of equals; an expert's uses are kept when it is
 * dropped, unlike the simulator's LFU, which counts from its insertion); or the one
 * expected latest (moecast's next-use estimate through mc_next_use_*: its layer's gaps
 * between an expert's uses, its own use rate; `moecast run --policy next-use`). */
typedef enum { EVICT_LRU, EVICT_LFU, EVICT_NEXT_USE } Eviction;
#define LFU_HALF_LIFE 64

/* Its name: "lru", "lfu" or "next-use". */
const char *eviction_name(Eviction e);

/* Every eviction's name, for messages: "lru, lfu or next-use". */
const char *eviction_names(void);

/* The eviction `name` names into *out: 1, or 0 where it names none. */
int eviction_parse(const char *name, Eviction *out);

/* The resident set: at most `capacity` experts in the page cache. Without a planner,
 * `slots` of them hold staged experts not used yet (oldest dropped when a newer one is
 * staged) and the rest the used ones (dropped by `eviction`). With a planner, staged
 * experts share the whole set; a staged expert its layer routed without (stale) goes
 * first, then a used one by `eviction` (the planner is told). Experts are indexed
 * `layer * n_experts + expert`. `mu` guards it: `use_experts` takes it itself (and lets
 * it go while waiting for reads); the other calls but `issue_reads` need it held. */
typedef struct {
    Experts *ex;
    int fd, capacity, slots, n_ids;
    uintptr_t map_lo;
    size_t map_off, map_len;
    /* ages: 0 = not held; else last use (used), staging time (staged, stale) */
    uint64_t *used_age, *staged_age, *stale_age, clock;
    double *use_key;     /* LFU: log of each expert's decayed uses, undecayed to use 0;
                          * next-use: minus its expected next use (lowest drops first) */
    struct mc_next_use *next_use; /* next-use's estimates (NULL under LRU and LFU) */
    double *due;                  /* a layer's expected next uses (next-use) */
    uint64_t uses_so_far; /* uses counted (LFU's clock) */
    double decay;        /* LFU's decay per use */
    Eviction eviction;
    uint8_t *landed;   /* staged experts whose read is known to have landed */
    uint8_t *keep;     /* the layer about to run: never evicted for a staged read */
    uint8_t *want;     /* staged reads decided, not issued yet (atomic) */
    uint8_t *issued;   /* staged reads issued since the last settle (under io_mu) */
    uint8_t *dropped;  /* dropped with its staged read issued and not landed: its pages may still come */
    uint64_t reads_issued; /* staged reads issued so far (atomic) */
    uint32_t *plan_out;
    int n_used, n_staged, n_stale;
    uint64_t step;      /* decode steps started (a forecast made in an earlier one is stale) */
    int next_layer;     /* the layers of the current step routed so far */
    struct mc_planner *planner; /* NULL: a fixed budget in staging slots */
    int measured;               /* the planner has a read time (timed or stated) */
    int tell_issue;             /* tell the planner the time issuing takes (the caller sets it) */
    pthread_mutex_t mu;         /* see above */
    pthread_mutex_t io_mu;      /* held while staged reads are issued */
    long uses, resident_uses, late, staged;
    long stray_uses; /* uses of an expert not held whose pages were in memory (dropped, read again) */
    /* per MoE layer: experts staged for it, its uses that found them staged (landed or
     * late), and its uses read on demand (timed steps) */
    long layer_staged[MAX_LAYERS], layer_staged_used[MAX_LAYERS], layer_demand[MAX_LAYERS];
    double bytes_demand, bytes_staged, bytes_wasted, stall_s;
    double issue_s; /* spent issuing staged reads (under io_mu; the planner is told each read's share) */
} Residency;

/* A resident set over llama.cpp's mapping of ex->path, everything dropped from the page
 * cache. `planner` (owned by the caller) plans the staging; `measured`: it was given
 * timings and may plan before a read is timed. */
void residency_init(Residency *r, Experts *ex, int capacity, int slots, Eviction eviction, struct mc_planner *planner,
                    int measured);
void residency_free(Residency *r);

/* Layer l is about to run `ids[k]`: marks them used; with `decode` (a decode step, not a
 * prompt) tells the planner the layer's routing and its demand reads, and with `count`
 * (a timed decode step) counts residency; then, without `mu` (the prefetcher plans
 * meanwhile), reads the missing ones whole, calls `meanwhile(arg)` if there are any (work
 * for the wait: a forecast), waits for them, and tells the planner the time they held
 * the layer up (`meanwhile` included: the rest of a layer is its compute) and the reads'
 * time (not when they all landed during `meanwhile`). */
void use_experts(Residency *r, int l, const int *ids, int k, int decode, int count, void (*meanwhile)(void *),
                 void *arg);

/* Fixed budget: stages expert e of layer l unless held. Planned: offers layer l's
 * forecast `ranking[n]` (best first) to the planner and stages what it picks (nothing
 * before a read is timed). Both append the reads to issue to `reads` (`*n_reads`). Returns
 * MC_OK or the planner's error. */
void stage_expert(Residency *r, int l, int e, uint32_t *reads, int *n_reads);
int offer_forecast(Residency *r, int l, const uint16_t *ranking, int n, uint32_t *reads, int *n_reads);

/* Issues the staged reads decided (those not dropped since); called without `mu`, so a
 * decode step never waits while they are queued on the device. With `tell_issue` it then
 * tells the planner (taking `mu`) the wall time each took the calling thread: page
 * allocation and queueing, and the wait while the device's queue is full. */
void issue_reads(Residency *r, const uint32_t *reads, int n);

/* Waits for every staged read issued since the last settle to land, held or not (a
 * drop does not take on pages still being read: an evicted expert's read lands after
 * it), drops those the set no longer holds, and waits until every expert it holds is in
 * the page cache: no read of this set lands later, and another resident set may take
 * the page cache over (residency_restore) or start (residency_init). */
void residency_settle(Residency *r);

/* Makes the page cache hold what this set holds, untimed: experts it does not hold
 * dropped, those it holds read and waited for. Resident sets take turns over one
 * mapping this way (moecast_prefetch -W); the one before was settled. */
void residency_restore(Residency *r);

/* Staged experts never used count as wasted. */
void residency_finish(Residency *r);

#endif
