/* Replays a routing trace through moecast's C API and prints every forecast.
 *
 *   replay PREDICTOR_DIR INPUT BUDGET
 *
 * INPUT is text: "S" starts a sequence; "T token e0 e1 ..." is one token with its
 * routing (n_moe_layers * top_k expert ids, layer-major). For each token this prints
 * "N <token>:" and the next-token forecast, then for lookahead predictors one
 * "L <known>:" line per known-layer count, then observes the token. Exit status 0 on
 * success; on an error the failing call and mc_last_error() go to stderr. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "programs.h"
#include "moecast.h"

static void print_ids(const char *tag, unsigned n, const uint16_t *ids, size_t len) {
    printf("%s %u:", tag, n);
    for (size_t i = 0; i < len; i++) printf(" %u", (unsigned)ids[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: replay PREDICTOR_DIR INPUT BUDGET\n");
        return 2;
    }
    unsigned budget = (unsigned)atoi(argv[3]);
    mc_predictor *p = NULL;
    CHECK(mc_predictor_open(argv[1], &p));
    uint32_t layers, experts, top_k, horizon;
    CHECK(mc_predictor_shape(p, &layers, &experts, &top_k, &horizon));
    mc_session *s = NULL;
    CHECK(mc_session_new(p, &s));
    FILE *in = fopen(argv[2], "r");
    if (!in) {
        perror(argv[2]);
        return 1;
    }
    size_t width = (size_t)layers * top_k;
    uint16_t *routing = calloc(width, sizeof(uint16_t));
    uint16_t *next = calloc((size_t)layers * budget, sizeof(uint16_t));
    uint16_t *ahead = calloc((size_t)(horizon ? horizon : 1) * budget, sizeof(uint16_t));
    unsigned token;
    int record;
    while ((record = next_record(in, width, &token, routing)) > 0) {
        if (record == 'S') {
            CHECK(mc_session_reset(s));
            continue;
        }
        CHECK(mc_session_predict_next(s, token, budget, next));
        print_ids("N", token, next, (size_t)layers * budget);
        for (uint32_t known = 1; horizon > 0 && known < layers; known++) {
            CHECK(mc_session_predict_lookahead(s, token, known, routing, budget, ahead));
            print_ids("L", known, ahead, (size_t)horizon * budget);
        }
        CHECK(mc_session_observe(s, token, routing));
    }
    if (record < 0) {
        fprintf(stderr, "%s: bad input\n", argv[2]);
        return 3;
    }
    fclose(in);
    free(routing);
    free(next);
    free(ahead);
    mc_session_free(s);
    mc_predictor_free(p);
    return 0;
}
