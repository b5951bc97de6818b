/* moecast_prefetch -s: the per-step CSV (see step_log.h). Linux only. */
#define _GNU_SOURCE
#include "step_log.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

static char part_path[4096];
static const char *final_path;

static void remove_part(void) {
    if (part_path[0]) remove(part_path);
}

FILE *step_log_open(const char *path) {
    FILE *log;
    final_path = path;
    snprintf(part_path, sizeof part_path, "%s.partial", path);
    if (!(log = fopen(part_path, "w"))) die(part_path, strerror(errno));
    atexit(remove_part);
    fputs("mode,round,forecast,seconds,staged_reads,demand_reads,stall_s,issue_s\n", log);
    return log;
}

void step_log_step(FILE *log, StepCounters *last, Residency *res, const char *mode, int round, int forecast,
                   double seconds, int timed) {
    pthread_mutex_lock(&res->mu);
    long demand = res->uses - res->resident_uses - res->late;
    double stall = res->stall_s;
    pthread_mutex_unlock(&res->mu);
    pthread_mutex_lock(&res->io_mu);
    uint64_t issued = __atomic_load_n(&res->reads_issued, __ATOMIC_RELAXED);
    double issue = res->issue_s;
    pthread_mutex_unlock(&res->io_mu);
    if (timed)
        fprintf(log, "%s,%d,%d,%.6f,%llu,%ld,%.6f,%.6f\n", mode, round, forecast, seconds,
                (unsigned long long)(issued - last->issued), demand - last->demand, stall - last->stall,
                issue - last->issue);
    *last = (StepCounters){.issued = issued, .demand = demand, .stall = stall, .issue = issue};
}

void step_log_close(FILE *log) {
    int failed = ferror(log);
    failed |= fclose(log) != 0;
    if (failed) die(part_path, "cannot write");
    if (rename(part_path, final_path)) die(final_path, strerror(errno));
    part_path[0] = 0;
}
