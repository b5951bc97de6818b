/* What the C test programs share: CHECK (a call that does not return MC_OK prints its
 * text, its code and mc_last_error() to stderr and makes main return 1) and the reader
 * of their input. */
#ifndef MOECAST_TEST_PROGRAMS_H
#define MOECAST_TEST_PROGRAMS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "moecast.h"

#define CHECK(call)                                                              \
    do {                                                                         \
        int rc_ = (call);                                                        \
        if (rc_ != MC_OK) {                                                      \
            fprintf(stderr, "%s failed (%d): %s\n", #call, rc_, mc_last_error()); \
            return 1;                                                            \
        }                                                                        \
    } while (0)

/* The next record of `in`: 'S' (a sequence starts), 'T' (a token: its id into *token and
 * its routing, `width` expert ids, into routing), 0 at the end, -1 on bad input. */
static int next_record(FILE *in, size_t width, unsigned *token, uint16_t *routing) {
    char kind[2];
    if (fscanf(in, "%1s", kind) != 1) return 0;
    if (kind[0] == 'S') return 'S';
    if (kind[0] != 'T' || fscanf(in, "%u", token) != 1) return -1;
    for (size_t i = 0; i < width; i++) {
        unsigned x;
        if (fscanf(in, "%u", &x) != 1) return -1;
        routing[i] = (uint16_t)x;
    }
    return 'T';
}

#endif
