/* One mode's round of moecast_prefetch.c: its resident set, planner, prefetcher and
 * decoder, set up, fed a replayed trace's steps or the prompts, and counted into the
 * mode's totals. The modes' rounds take turns over one llama.cpp context (-W), or run one
 * after the other. Linux only. */
#ifndef MOECAST_MODE_ROUND_H
#define MOECAST_MODE_ROUND_H

#include <stdint.h>
#include <stdio.h>

#include "decoder.h"
#include "expert_residency.h"
#include "llama.h"
#include "moecast.h"
#include "prefetcher.h"

#define MAX_MODES 8

/* What one mode counted over its rounds. */
typedef struct {
    int budget; /* -1: on demand; 0: planned; N: a fixed budget */
    int oracle; /* planned, from the replayed trace's own experts */
    Eviction eviction; /* its resident set's (-e, or an on-demand mode's own: -b lru, lfu, next-use) */
    int own_eviction;  /* an on-demand mode beside the first, named by its eviction */
    double tps, resident, demand, staged, wasted, stall, issue;
    long stray_uses; /* see Residency */
    long layer_staged[MAX_LAYERS], layer_staged_used[MAX_LAYERS], layer_demand[MAX_LAYERS]; /* see Residency */
    double round_tps, ratio_min, ratio_max; /* the last round's tokens/s; each round's over on demand's */
    uint64_t steps, steps_off, steps_fewer;
    struct mc_plan_report plan;
    struct mc_guard *guard; /* planned: kept over the rounds, as a runtime keeps it over requests */
} ModeTotals;

/* What every mode's round shares: the model, the predictor, llama.cpp's context, the
 * settings. */
typedef struct {
    Experts *ex;
    int capacity, total, use_guard, inline_forecasts, wait_forecasts, delay_ms, n_ctx, threads[2];
    double read_us, layer_us;
    struct mc_predictor *pred;
    const char *pred_dir, *model_path, *trace_path;
    uint32_t horizon, input_dim;
    uint16_t *prefill_ids;
    float *input;
    const struct mc_trace *trace;
    struct llama_context *ctx;
    struct llama_batch batch;
    FILE *steps_csv;
    Harness *active; /* the harness llama.cpp's eval callback works with */
} Bench;

/* One mode's round: its resident set, planner, prefetcher and decoder. */
typedef struct {
    Residency res;
    Prefetcher w;
    Harness h;
    Decoder d;
    struct mc_planner *planner;
    double decode_s;
    long steps;
    char name[24];
} ModeRound;

/* The mode's name in the table: on-demand (on-demand-lru, -lfu), planned, budget-N or oracle. */
void mode_name(const ModeTotals *mt, char *name, size_t size);

/* Prints, per MoE layer, each mode's experts staged for it (of them used there) / read
 * on demand there, a round's mean (moecast_prefetch -L). */
void print_layer_counts(const ModeTotals *modes, int n_modes, int n_moe, int rounds);

/* Starts mode `mt`'s round `round` (0-based): everything dropped from the page cache. */
void mode_round_start(ModeRound *mr, ModeTotals *mt, Bench *b, int round);

/* Ends the round: its prefetcher stopped, its reads settled (residency_settle), its
 * counts added to the mode's totals. */
void mode_round_finish(ModeRound *mr, ModeTotals *mt, Bench *b, int round, int rounds);

/* Decodes positions [p0, p1) of replayed sequence `seq` (its experts forced) with mode
 * round `mr`, up to `max_steps` timed steps (0: no limit); llama.cpp's memory is cut back
 * to p0 first, so modes taking turns decode the same tokens. */
void replay_steps(ModeRound *mr, Bench *b, uint32_t seq, const uint32_t *tokens, const uint16_t *experts,
                  uint32_t p0, uint32_t p1, long max_steps);

/* How far sequence `seq` of the trace replays: up to its end, the context, and the first
 * token id outside the vocabulary. */
uint32_t replay_length(Bench *b, uint32_t seq, const uint32_t **tokens, const uint16_t **experts);

/* Greedy decoding of the prompts with mode round `mr`, up to `new_tokens` each. */
void decode_prompts(ModeRound *mr, Bench *b, llama_token (*prompts)[512], const int *lens, int n_prompts,
                    int new_tokens);

/* Mode round `next` takes llama.cpp over from `prev` (NULL: none yet; or `next`
 * itself, so that every window starts alike): prev's forecasts drained and its staged
 * reads settled, the page cache made next's resident set. */
void hand_over(ModeRound *prev, ModeRound *next);

#endif
