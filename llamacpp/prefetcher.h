/* The prefetcher of moecast_prefetch.c: the predictor session's jobs (reset, observe,
 * forecast) and the staging of what the forecasts name, run where they are posted (the
 * decode thread) or, with a thread of its own, on the second core while llama.cpp
 * computes. Linux only. */
#ifndef MOECAST_PREFETCHER_H
#define MOECAST_PREFETCHER_H

#include <pthread.h>
#include <stdint.h>

#include "expert_residency.h"
#include "moecast.h"

enum { JOB_RESET, JOB_OBSERVE, JOB_NEXT, JOB_AHEAD };

typedef struct {
    int type, known;
    uint64_t step; /* the decode step it was posted in */
    uint32_t token;
    const uint16_t *truth; /* the oracle's: the replayed token's recorded experts [layer][k] */
    const float *input;    /* JOB_AHEAD with a predictor that reads them: the last known layer's router input */
    uint16_t routed[MAX_LAYERS * MAX_K];
} Job;

#define RING 256

typedef struct {
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t work, idle;
    Job ring[RING];
    Job current; /* the job running (on the thread: a copy, its ring slot free once taken) */
    int head, count, busy, stop, error;
    int inline_jobs; /* no thread: every job runs where it is posted */
    int wait;        /* with a thread: every forecast is waited for where it is posted (tests) */
    int delay_ms;    /* with a thread: each forecast waits this long before it is offered, so it lands late (tests) */
    char message[512]; /* mc_last_error() is per thread: the worker's, kept for main */
    struct mc_session *session;
    int budget, horizon; /* budget 0: planned (every forecast layer's top-k offered) */
    int oracle;          /* planned from the replayed trace's own experts, no session */
    const uint16_t *truth; /* the oracle's: the token being decoded's recorded experts */
    size_t input_dim;      /* the predictor's router-input width (0: it reads none) */
    float *inputs;         /* (RING + 2) x input_dim: each ring slot's router input, the inline job's, the running job's */
    Residency *res;
    uint16_t ahead[MAX_LAYERS * MAX_K];
    uint32_t *reads;
} Prefetcher;

/* Starts the prefetcher's thread (none with `inline_jobs`); the fields above it reads
 * are set. Dies when the thread cannot start. */
void prefetcher_start(Prefetcher *w);

/* Waits until no job is queued or running (their staged reads issued). */
void prefetcher_drain(Prefetcher *w);

/* Waits for the queued jobs, stops the thread and frees the inputs' storage; returns 1
 * when a job failed (the message in `w->message`). */
int prefetcher_stop(Prefetcher *w);

/* Queues a job (runs it, with `inline_jobs`: only the decode thread posts, and a job
 * posts nothing); a forecast is dropped when two jobs already wait (it would land late).
 * `routed` holds `n` experts; `input`, for JOB_AHEAD, `input_dim` values or NULL. */
void prefetcher_post(Prefetcher *w, int type, uint32_t token, int known, const uint16_t *routed, int n, const float *input);

/* prefetcher_post(), waiting for the queue to drain before and after with `wait`. */
void prefetcher_forecast(Prefetcher *w, int type, uint32_t token, int known, const uint16_t *routed, int n, const float *input);

#endif
