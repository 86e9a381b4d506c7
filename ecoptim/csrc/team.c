/* The thread team (see team.h). */
#include <pthread.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "team.h"

void eco_run_parallel(void *(*fn)(void *), void *items, size_t size, int n) {
    char *item = (char *)items;
#ifdef _OPENMP
    if (n > 1) {
#pragma omp parallel num_threads(n)
        { /* a smaller team than asked for (OMP_THREAD_LIMIT, nesting) runs the remaining items in turn */
            const int got = omp_get_num_threads();
            for (int t = omp_get_thread_num(); t < n; t += got) fn(item + t * size);
        }
        return;
    }
#else
    pthread_t th[ECO_MAX_THREADS];
    int started[ECO_MAX_THREADS] = {0};
    for (int t = 1; t < n; t++) started[t] = pthread_create(&th[t], NULL, fn, item + t * size) == 0;
    for (int t = 1; t < n; t++) if (!started[t]) fn(item + t * size); /* no thread: do it here */
    for (int t = 1; t < n; t++) if (started[t]) pthread_join(th[t], NULL);
#endif
    fn(item);
}

#ifndef _OPENMP
typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int state; /* 0 wait, 1 go, 2 abort */
} gate;

typedef struct {
    gate *g;
    void *(*fn)(void *);
    void *item;
} gated;

static void *gated_run(void *p) {
    gated *x = (gated *)p;
    pthread_mutex_lock(&x->g->mu);
    while (x->g->state == 0) pthread_cond_wait(&x->g->cv, &x->g->mu);
    int go = x->g->state == 1;
    pthread_mutex_unlock(&x->g->mu);
    if (go) x->fn(x->item);
    return NULL;
}

int eco_run_together(void *(*fn)(void *), void *items, size_t size, int n) {
    char *item = (char *)items;
    gate g = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};
    gated tg[ECO_MAX_THREADS];
    pthread_t th[ECO_MAX_THREADS];
    int started = 1;
    for (; started < n; started++) {
        tg[started].g = &g;
        tg[started].fn = fn;
        tg[started].item = item + started * size;
        if (pthread_create(&th[started], NULL, gated_run, &tg[started]) != 0) break;
    }
    pthread_mutex_lock(&g.mu);
    g.state = started == n ? 1 : 2;
    pthread_cond_broadcast(&g.cv);
    pthread_mutex_unlock(&g.mu);
    if (started == n) fn(item);
    for (int t = 1; t < started; t++) pthread_join(th[t], NULL);
    return started == n;
}
#endif
