/* This thread's number and the team's size inside an OpenMP parallel region (0 and 1 without OpenMP). */
#ifndef SPA3D_THREADS_H
#define SPA3D_THREADS_H
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif

static inline void thread_slot(int64_t *me, int64_t *nt)
{
#ifdef _OPENMP
    *me = omp_get_thread_num();
    *nt = omp_get_num_threads();
#else
    *me = 0;
    *nt = 1;
#endif
}
#endif
