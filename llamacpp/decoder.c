/* One decode step inside llama.cpp (see decoder.h). */
#define _GNU_SOURCE
#include "decoder.h"

#include <pthread.h>
#include <stdarg.h>
#include <string.h>

#include "ggml-backend.h"

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

bool harness_callback(struct ggml_tensor *t, bool ask, void *user) {
    Harness *h = *(Harness **)user;
    if (!h) return !ask;
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

double decode_step(Decoder *d, llama_token token, int pos, int count) {
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
