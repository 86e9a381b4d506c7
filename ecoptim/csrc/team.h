/* The thread team: how the kernels run work on several threads. Built with OpenMP (kernels.py does so where torch
 * runs on GNU libgomp), the threads are those of the OpenMP pool, which is torch's own (the library is linked to
 * the libgomp file torch loaded, so the loader reuses it): its workers are already running, and still spinning
 * after torch's last parallel op (a backward pass), so the kernels do not have to compete with them for the
 * cores, as threads of their own would. Otherwise the kernels start threads of their own (pthreads) per call. */
#ifndef ECO_TEAM_H
#define ECO_TEAM_H
#include <stddef.h>

#define ECO_MAX_THREADS 64

/* fn(items[0]) .. fn(items[n-1]) concurrently (item t at items + t*size), independent of each other; the caller
 * runs item 0. n <= ECO_MAX_THREADS. */
__attribute__((visibility("hidden"))) void eco_run_parallel(void *(*fn)(void *), void *items, size_t size, int n);

#ifndef _OPENMP
/* fn(items[0]) .. fn(items[n-1]) on n threads that all run at once (members that meet at barriers): the threads are
 * started behind a gate, and if one cannot be created the ones already waiting are sent home before running
 * anything. Returns 1 if all n ran, 0 if none did. */
__attribute__((visibility("hidden"))) int eco_run_together(void *(*fn)(void *), void *items, size_t size, int n);
#endif
#endif
