/* Plans prefetch for a routing trace through moecast's C API: the online blend
 * forecasts after each routed layer, the planner answers which experts to stage.
 *
 *   staging COUNTS INPUT BUDGET READ_US LAYER_US CAPACITY
 *
 * COUNTS is what mc_blend_open takes (a trace or a predictor directory); INPUT is the
 * replay program's text ("S" starts a sequence; "T token e0 e1 ..." is one token with
 * its routing, layer-major). The planner plans with the stated timings. After each
 * layer routes (its demand reads: its experts not staged for it) this prints
 * "P <layer>:" and the experts staged for the forecast rows, then at the end
 * "R offered staged late not_worth". Exit status 0 on success. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "programs.h"
#include "moecast.h"

int main(int argc, char **argv) {
    if (argc != 7) {
        fprintf(stderr, "usage: staging COUNTS INPUT BUDGET READ_US LAYER_US CAPACITY\n");
        return 2;
    }
    unsigned budget = (unsigned)atoi(argv[3]);
    mc_blend *b = NULL;
    CHECK(mc_blend_open(argv[1], &b));
    uint32_t layers, experts, top_k, horizon;
    CHECK(mc_blend_shape(b, &layers, &experts, &top_k, &horizon));
    mc_planner *p = NULL;
    CHECK(mc_planner_new(layers, experts, top_k, (uint32_t)atoi(argv[6]), atof(argv[4]),
                         atof(argv[5]), &p));
    FILE *in = fopen(argv[2], "r");
    if (!in) {
        perror(argv[2]);
        return 1;
    }
    size_t width = (size_t)layers * top_k, rows = (size_t)horizon * budget;
    uint16_t *routing = calloc(width, sizeof(uint16_t));
    uint16_t *ahead = calloc(rows, sizeof(uint16_t));
    float *probs = calloc(rows, sizeof(float));
    unsigned char *staged = calloc((size_t)layers * experts, 1);
    uint32_t room = layers * experts, n_out = 0;
    uint32_t *out = calloc(room, sizeof(uint32_t));
    unsigned token;
    int record;
    while ((record = next_record(in, width, &token, routing)) > 0) {
        if (record == 'S') {
            CHECK(mc_blend_reset(b));
            continue;
        }
        CHECK(mc_planner_token_started(p));
        for (uint32_t l = 0; l < layers; l++) {
            const uint16_t *routed = routing + (size_t)l * top_k;
            uint32_t demand = 0;
            for (uint32_t j = 0; j < top_k; j++) demand += !staged[l * experts + routed[j]];
            memset(staged + (size_t)l * experts, 0, experts);
            CHECK(mc_planner_layer_routed(p, l, routed, top_k, demand));
            CHECK(mc_blend_forecast(b, l, routed, l ? routed - top_k : NULL, budget, ahead, probs));
            printf("P %u:", l);
            for (uint32_t i = 0; i < horizon; i++) {
                uint32_t target = (l + 1 + i) % layers;
                CHECK(mc_planner_plan(p, target, ahead + i * budget, probs + i * budget, NULL,
                                      budget, 0, 0, out, room, &n_out));
                for (uint32_t j = 0; j < n_out; j++) {
                    staged[out[j]] = 1;
                    printf(" %u", out[j]);
                }
            }
            printf("\n");
        }
        CHECK(mc_blend_observe(b, token, routing));
    }
    mc_plan_report r;
    CHECK(mc_planner_report(p, &r));
    printf("R %llu %llu %llu %llu\n", (unsigned long long)r.offered,
           (unsigned long long)r.staged, (unsigned long long)r.late,
           (unsigned long long)r.not_worth);
    if (record < 0) {
        fprintf(stderr, "%s: bad input\n", argv[2]);
        return 3;
    }
    fclose(in);
    free(routing);
    free(ahead);
    free(probs);
    free(staged);
    free(out);
    mc_planner_free(p);
    mc_blend_free(b);
    return 0;
}
