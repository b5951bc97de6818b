/* One decode step of moecast_prefetch.c inside llama.cpp: the eval callback that reads
 * (or, replaying a trace, forces) each MoE layer's routing, makes its experts resident
 * and forecasts the layers ahead, and the step around it (the prefetch guard asked, the
 * planner told, the token's own forecast made). Linux only. */
#ifndef MOECAST_DECODER_H
#define MOECAST_DECODER_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "expert_residency.h"
#include "ggml.h"
#include "llama.h"
#include "moecast.h"
#include "prefetcher.h"
#include "step_log.h"

/* What the eval callback works with: one mode's residency and prefetcher, and the step
 * being decoded. */
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

/* llama.cpp's eval callback; `user` points at the pointer to the Harness in use (the
 * modes' harnesses take turns over one llama.cpp context). */
bool harness_callback(struct ggml_tensor *t, bool ask, void *user);

/* One mode's decoding: llama.cpp's context and batch, and what decides its prefetch. */
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
 * layers forecast, llama.cpp run, the routing observed; `count`: a timed step. Returns
 * its seconds; dies with the callback's first error. */
double decode_step(Decoder *d, llama_token token, int pos, int count);

#endif
