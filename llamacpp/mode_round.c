/* One mode's round of moecast_prefetch.c (see mode_round.h). */
#include "mode_round.h"

#include <stdlib.h>
#include <string.h>

void mode_name(const ModeTotals *mt, char *name, size_t size) {
    if (mt->oracle) snprintf(name, size, "oracle");
    else if (mt->budget < 0 && mt->own_eviction) snprintf(name, size, "on-demand-%s", eviction_name(mt->eviction));
    else if (mt->budget < 0) snprintf(name, size, "on-demand");
    else if (mt->budget == 0) snprintf(name, size, "planned");
    else snprintf(name, size, "budget-%d", mt->budget);
}

void print_layer_counts(const ModeTotals *modes, int n_modes, int n_moe, int rounds) {
    printf("per MoE layer, a round's experts staged for it (of them used there) / read on demand there:\nlayer");
    for (int mode = 0; mode < n_modes; mode++) {
        char name[24];
        mode_name(&modes[mode], name, sizeof name);
        printf(" %22s", name);
    }
    printf("\n");
    for (int l = 0; l < n_moe; l++) {
        printf("%5d", l);
        for (int mode = 0; mode < n_modes; mode++) {
            char cell[64];
            const ModeTotals *mt = &modes[mode];
            snprintf(cell, sizeof cell, "%.0f (%.0f) / %.0f", (double)mt->layer_staged[l] / rounds,
                     (double)mt->layer_staged_used[l] / rounds, (double)mt->layer_demand[l] / rounds);
            printf(" %22s", cell);
        }
        printf("\n");
    }
}

void mode_round_start(ModeRound *mr, ModeTotals *mt, Bench *b, int round) {
    int budget = mt->budget;
    Experts *ex = b->ex;
    mode_name(mt, mr->name, sizeof mr->name);
    mr->planner = NULL, mr->decode_s = 0, mr->steps = 0;
    if (budget == 0 && mc_planner_new((uint32_t)ex->n_moe, (uint32_t)ex->n_experts, (uint32_t)ex->top_k,
                                      (uint32_t)b->capacity, b->read_us, b->layer_us, &mr->planner))
        die("planner", mc_last_error());
    if (budget == 0 && b->use_guard && b->capacity < b->total && !mt->guard && mc_guard_new(8, 6, &mt->guard))
        die("prefetch guard", mc_last_error());
    int slots = budget > 0 ? (2 * budget < b->capacity - ex->top_k ? 2 * budget : b->capacity - ex->top_k) : 0;
    residency_init(&mr->res, ex, b->capacity, slots, mt->eviction, mr->planner, b->read_us > 0);
    mr->res.tell_issue = b->inline_forecasts && b->read_us == 0; /* staged reads issued on the decode thread */
    memset(&mr->h, 0, sizeof mr->h);
    mr->h.res = &mr->res, mr->h.prefill_ids = b->prefill_ids, mr->h.trace = b->trace;
    if (budget >= 0) {
        Prefetcher *w = &mr->w;
        memset(w, 0, sizeof *w);
        if (!mt->oracle && mc_session_new(b->pred, &w->session)) die(b->pred_dir, mc_last_error());
        if (!(w->reads = calloc((size_t)b->total, sizeof(uint32_t)))) die("prefetcher", "out of memory");
        w->res = &mr->res, w->oracle = mt->oracle;
        /* the oracle reads as far ahead as the predictor (3 layers without one) */
        w->budget = budget, w->horizon = b->horizon ? (int)b->horizon : 3, w->inline_jobs = b->inline_forecasts;
        w->wait = b->wait_forecasts, w->delay_ms = b->delay_ms, w->input_dim = mt->oracle ? 0 : b->input_dim;
        prefetcher_start(w);
        mr->h.session = w, mr->h.input = w->input_dim ? b->input : NULL;
    }
    /* with every expert resident there is nothing to forecast */
    mr->d = (Decoder){.ctx = b->ctx, .batch = b->batch, .h = &mr->h, .planner = mr->planner, .guard = mt->guard,
                      .forecasting = mr->h.session && b->capacity < b->total, .n_moe = ex->n_moe, .top_k = ex->top_k,
                      .threads = {b->threads[0], b->threads[1]}, .model_path = b->model_path,
                      .steps_csv = b->steps_csv, .mode = mr->name, .round = round + 1};
}

void mode_round_finish(ModeRound *mr, ModeTotals *mt, Bench *b, int round, int rounds) {
    if (mr->h.session) {
        if (prefetcher_stop(&mr->w)) die(b->pred_dir ? b->pred_dir : "forecasts", mr->w.message);
        if (mr->w.session) mc_session_free(mr->w.session);
        free(mr->w.reads);
    }
    Residency *res = &mr->res;
    residency_settle(res); /* none of its reads lands after the next round's drop */
    residency_finish(res);
    mt->round_tps = mr->steps / mr->decode_s, mt->tps += mt->round_tps, mt->steps += (uint64_t)mr->steps;
    uint64_t off = mt->steps_off;
    if (mt->guard) mc_guard_steps_off(mt->guard, &mt->steps_off);
    fprintf(stderr, "round %d/%d %s: %.1f tokens/s", round + 1, rounds, mr->name, mt->round_tps);
    if (mt->guard) fprintf(stderr, ", %llu of %ld steps without prefetch", (unsigned long long)(mt->steps_off - off), mr->steps);
    fprintf(stderr, "\n");
    mt->resident += (double)res->resident_uses / (res->uses ? res->uses : 1);
    mt->demand += res->bytes_demand, mt->staged += res->bytes_staged, mt->wasted += res->bytes_wasted;
    mt->stall += res->stall_s, mt->issue += res->issue_s, mt->stray_uses += res->stray_uses;
    for (int l = 0; l < b->ex->n_moe; l++) {
        mt->layer_staged[l] += res->layer_staged[l], mt->layer_staged_used[l] += res->layer_staged_used[l];
        mt->layer_demand[l] += res->layer_demand[l];
    }
    if (mr->planner) mc_planner_report(mr->planner, &mt->plan);
    mt->steps_fewer += mr->d.steps_fewer;
    residency_free(res);
    mc_planner_free(mr->planner);
}

void replay_steps(ModeRound *mr, Bench *b, uint32_t seq, const uint32_t *tokens, const uint16_t *experts,
                  uint32_t p0, uint32_t p1, long max_steps) {
    Harness *h = &mr->h;
    b->active = h;
    if (!llama_memory_seq_rm(llama_get_memory(b->ctx), 0, (llama_pos)p0, -1))
        die(b->model_path, "llama.cpp cannot cut its memory back to a position (the modes' turns, -W, need it)");
    if (p0 == 0 && h->session) prefetcher_post(h->session, JOB_RESET, 0, 0, NULL, 0, NULL);
    h->seq = seq;
    for (uint32_t pos = p0; pos < p1 && (!max_steps || mr->steps < max_steps); pos++) {
        h->forced = experts + (size_t)pos * b->ex->n_moe * b->ex->top_k, h->pos = pos;
        double dt = decode_step(&mr->d, (llama_token)tokens[pos], (int)pos, pos > 0);
        if (pos > 0) mr->decode_s += dt, mr->steps++;
    }
    h->forced = NULL;
}

uint32_t replay_length(Bench *b, uint32_t seq, const uint32_t **tokens, const uint16_t **experts) {
    uint32_t len, n = 0;
    if (mc_trace_sequence(b->trace, seq, &len, tokens, experts)) die(b->trace_path, mc_last_error());
    int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(llama_get_model(b->ctx)));
    while (n < len && (int)n < b->n_ctx && (int)(*tokens)[n] < n_vocab) n++;
    return n;
}

void decode_prompts(ModeRound *mr, Bench *b, llama_token (*prompts)[512], const int *lens, int n_prompts,
                    int new_tokens) {
    Harness *h = &mr->h;
    Experts *ex = b->ex;
    const struct llama_vocab *vocab = llama_model_get_vocab(llama_get_model(b->ctx));
    int n_vocab = llama_vocab_n_tokens(vocab);
    b->active = h;
    for (int p = 0; p < n_prompts; p++) {
        llama_memory_clear(llama_get_memory(b->ctx), true);
        if (h->session) prefetcher_post(h->session, JOB_RESET, 0, 0, NULL, 0, NULL);
        struct llama_batch batch = b->batch;
        batch.n_tokens = lens[p];
        for (int i = 0; i < lens[p]; i++) {
            batch.token[i] = prompts[p][i], batch.pos[i] = i, batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0, batch.logits[i] = 1; /* every row: the last layer routes them all */
        }
        h->prefill = 1, h->count = 0, h->prefill_rows = lens[p];
        if (llama_decode(b->ctx, batch)) die(b->model_path, "llama_decode failed");
        h->prefill = 0;
        for (int i = 0; h->session && i < lens[p]; i++)
            prefetcher_post(h->session, JOB_OBSERVE, (uint32_t)prompts[p][i], 0,
                            h->prefill_ids + (size_t)i * ex->n_moe * ex->top_k, ex->n_moe * ex->top_k, NULL);
        int pos = lens[p];
        for (int step = 0; step < new_tokens - 1 && pos < b->n_ctx; step++) {
            const float *logits = llama_get_logits_ith(b->ctx, -1);
            llama_token next = 0;
            for (int v = 1; v < n_vocab; v++)
                if (logits[v] > logits[next]) next = v;
            if (llama_vocab_is_eog(vocab, next)) break;
            mr->decode_s += decode_step(&mr->d, next, pos++, 1);
            mr->steps++;
        }
    }
}

void hand_over(ModeRound *prev, ModeRound *next) {
    if (prev) {
        if (prev->h.session) prefetcher_drain(&prev->w);
        residency_settle(&prev->res);
    }
    residency_restore(&next->res);
}

