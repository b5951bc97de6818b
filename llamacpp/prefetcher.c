/* The prefetcher of moecast_prefetch.c (see prefetcher.h). */
#include "prefetcher.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static void run_job(Prefetcher *w, const Job *j) {
    Experts *ex = w->res->ex;
    int k = ex->top_k, per = w->budget ? w->budget : k, rc = 0, first = -1, layers = 0, n_reads = 0;
    switch (j->type) {
    case JOB_RESET: rc = w->oracle ? MC_OK : mc_session_reset(w->session); break;
    case JOB_OBSERVE: rc = w->oracle ? MC_OK : mc_session_observe(w->session, j->token, j->routed); break;
    case JOB_NEXT: /* its first layer: the later ones are forecast better once layers route */
        if (!w->oracle) rc = mc_session_predict_next(w->session, j->token, (uint32_t)per, w->ahead);
        first = 0, layers = 1;
        break;
    case JOB_AHEAD:
        if (!w->oracle)
            rc = mc_session_predict_lookahead_input(w->session, j->token, (uint32_t)j->known, j->routed, j->input,
                                                    j->input ? w->input_dim : 0, (uint32_t)per, w->ahead);
        first = j->known, layers = w->budget ? 1 : w->horizon;
        break;
    }
    if (!layers) goto done;
    if (w->delay_ms) nanosleep(&(struct timespec){w->delay_ms / 1000, (long)(w->delay_ms % 1000) * 1000000L}, NULL);
    for (int h = 0; w->oracle && h < layers && first + h < ex->n_moe; h++) /* the forecast the trace knows */
        memcpy(w->ahead + (size_t)h * per, j->truth + (size_t)(first + h) * k, (size_t)k * sizeof(uint16_t));
    pthread_mutex_lock(&w->res->mu);
    /* a forecast of a layer that has routed since (or of an earlier step) is for a lookup
     * gone by: offered, the planner would take it for the next token's */
    for (int h = 0; !rc && h < layers && first + h < ex->n_moe && j->step == w->res->step; h++) {
        if (first + h < w->res->next_layer) continue;
        const uint16_t *f = w->ahead + (size_t)h * per;
        if (!w->budget) rc = offer_forecast(w->res, first + h, f, per, w->reads, &n_reads);
        else
            for (int b = 0; b < per && f[b] != 0xFFFF; b++) stage_expert(w->res, first + h, f[b], w->reads, &n_reads);
    }
    pthread_mutex_unlock(&w->res->mu);
    issue_reads(w->res, w->reads, n_reads);
done:
    if (rc && !w->error) {
        snprintf(w->message, sizeof w->message, "%s", mc_last_error());
        w->error = 1;
    }
}

static void *worker_main(void *arg) {
    Prefetcher *w = arg;
    Job *job = &w->current;
    float *input = w->inputs ? w->inputs + (size_t)(RING + 1) * w->input_dim : NULL; /* the running job's */
    pthread_mutex_lock(&w->mu);
    for (;;) {
        while (!w->count && !w->stop) pthread_cond_wait(&w->work, &w->mu);
        if (!w->count) break;
        *job = w->ring[w->head];
        if (job->input) { /* its slot is free for the next post once the lock is let go */
            memcpy(input, job->input, w->input_dim * sizeof(float));
            job->input = input;
        }
        w->head = (w->head + 1) % RING, w->count--, w->busy = 1;
        pthread_mutex_unlock(&w->mu);
        run_job(w, job);
        pthread_mutex_lock(&w->mu);
        w->busy = 0;
        pthread_cond_broadcast(&w->idle);
    }
    pthread_mutex_unlock(&w->mu);
    return NULL;
}

void prefetcher_start(Prefetcher *w) {
    if (w->input_dim && !(w->inputs = calloc((size_t)(RING + 2) * w->input_dim, sizeof(float))))
        die("prefetcher", "out of memory for router inputs");
    pthread_mutex_init(&w->mu, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->idle, NULL);
    if (!w->inline_jobs && pthread_create(&w->thread, NULL, worker_main, w)) die("prefetcher", "cannot start its thread");
}

void prefetcher_drain(Prefetcher *w) {
    pthread_mutex_lock(&w->mu);
    while (w->count || w->busy) pthread_cond_wait(&w->idle, &w->mu);
    pthread_mutex_unlock(&w->mu);
}

int prefetcher_stop(Prefetcher *w) {
    prefetcher_drain(w);
    pthread_mutex_lock(&w->mu);
    w->stop = 1;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
    if (!w->inline_jobs) pthread_join(w->thread, NULL);
    free(w->inputs);
    w->inputs = NULL;
    return w->error;
}

/* Job `j`'s fields from a post; its input copied to `slot` (of `w->inputs`). */
static void fill(Prefetcher *w, Job *j, int slot, int type, uint32_t token, int known, const uint16_t *routed, int n,
                 const float *input) {
    j->type = type, j->token = token, j->known = known, j->step = w->res->step, j->truth = w->truth, j->input = NULL;
    if (n) memcpy(j->routed, routed, (size_t)n * sizeof(uint16_t));
    if (input && w->inputs) {
        float *x = w->inputs + (size_t)slot * w->input_dim;
        memcpy(x, input, w->input_dim * sizeof(float));
        j->input = x;
    }
}

void prefetcher_post(Prefetcher *w, int type, uint32_t token, int known, const uint16_t *routed, int n, const float *input) {
    if (w->inline_jobs) {
        fill(w, &w->current, RING, type, token, known, routed, n, input);
        run_job(w, &w->current);
        return;
    }
    pthread_mutex_lock(&w->mu);
    if ((type == JOB_NEXT || type == JOB_AHEAD) && w->count >= 2) { pthread_mutex_unlock(&w->mu); return; }
    while (w->count == RING) pthread_cond_wait(&w->idle, &w->mu);
    int slot = (w->head + w->count) % RING;
    fill(w, &w->ring[slot], slot, type, token, known, routed, n, input);
    w->count++;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->mu);
}

void prefetcher_forecast(Prefetcher *w, int type, uint32_t token, int known, const uint16_t *routed, int n, const float *input) {
    if (w->wait) prefetcher_drain(w);
    prefetcher_post(w, type, token, known, routed, n, input);
    if (w->wait) prefetcher_drain(w);
}
