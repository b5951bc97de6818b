/* moecast_prefetch -s: one CSV row per timed decode step (mode, round, whether it
 * forecast, seconds, staged reads issued, demand reads, stall and issuing seconds), for
 * llamacpp/step_costs.py to fit what a staged and a demand read add to a step. The log is
 * written beside its path and renamed when the run ends; a run that stops early leaves
 * neither. Linux only. */
#ifndef MOECAST_STEP_LOG_H
#define MOECAST_STEP_LOG_H

#include <stdint.h>
#include <stdio.h>

#include "expert_residency.h"

/* A residency's counters at a step: each row holds what its step added to them. Zero
 * when the residency starts (each mode's round). */
typedef struct {
    uint64_t issued;
    long demand;
    double stall, issue;
} StepCounters;

/* Opens `path`'s partial file and writes the header; dies naming the file if it cannot. */
FILE *step_log_open(const char *path);
/* Takes `res`'s counters since `last`; writes the step's row when it is timed (an
 * untimed step's reads are not charged to the next row). */
void step_log_step(FILE *log, StepCounters *last, Residency *res, const char *mode, int round, int forecast,
                   double seconds, int timed);
/* Closes the log and renames it to its path; dies naming the file if it cannot. */
void step_log_close(FILE *log);

#endif
