/*
 * xhpl for the bench: HPL alone, plus MPI ping-pong between the same ranks.
 *
 * Debian ships HPL only inside hpcc, whose driver always runs the whole HPC Challenge
 * suite around it (minutes of RandomAccess and FFT for seconds of HPL). This is HPL's
 * own code from hpcc's source (hpl/, built by scripts/build-hpl.sh) with a main of its
 * own: MPI ping-pong between rank 0 and every other rank, then HPL_main, which reads
 * hpccinf.txt and writes hpccoutf.txt as in hpcc.
 *
 * Ping-pong lines on rank 0's stdout, one per peer:
 *   pingpong PEER latency_us L bandwidth_MBps B
 * L: half the mean round trip of 8-byte messages; B: 2 MB messages, both directions
 * counted, 10^6 bytes per MB (hpcc's definitions).
 */
#include <stdio.h>
#include <stdlib.h>
#include "hpl.h"

/* hpcc's HPL_pdinfo falls back to hpcc's defaults when hpccinf.txt is unreadable; the
 * bench always writes that file, so a missing one is an error here. */
int HPCC_Defaults(HPL_T_test *TEST, int *NS, int *N, int *NBS, int *NB,
                  HPL_T_ORDER *PMAPPIN, int *NPQS, int *P, int *Q, int *NPFS,
                  HPL_T_FACT *PF, int *NBMS, int *NBM, int *NDVS, int *NDV, int *NRFS,
                  HPL_T_FACT *RF, int *NTPS, HPL_T_TOP *TP, int *NDHS, int *DH,
                  HPL_T_SWAP *FSWAP, int *TSWAP, int *L1NOTRAN, int *UNOTRAN, int *EQUIL,
                  int *ALIGN, MPI_Comm comm) {
  fprintf(stderr, "xhpl: hpccinf.txt is missing or malformed\n");
  MPI_Abort(comm, 2);
  return 1;
}

/* Every rank calls this (the barrier is collective); only rank 0 and `peer` exchange
 * `iters` round trips of `size` bytes. Returns the seconds they took. */
static double round_trips(int me, int peer, char *buf, int size, int iters) {
  MPI_Status st;
  double t0;
  int i;
  MPI_Barrier(MPI_COMM_WORLD);
  t0 = MPI_Wtime();
  for (i = 0; i < iters && (me == 0 || me == peer); i++) {
    if (me == 0) {
      MPI_Send(buf, size, MPI_BYTE, peer, 1, MPI_COMM_WORLD);
      MPI_Recv(buf, size, MPI_BYTE, peer, 1, MPI_COMM_WORLD, &st);
    } else {
      MPI_Recv(buf, size, MPI_BYTE, 0, 1, MPI_COMM_WORLD, &st);
      MPI_Send(buf, size, MPI_BYTE, 0, 1, MPI_COMM_WORLD);
    }
  }
  return MPI_Wtime() - t0;
}

static void ping_pong(int rank, int size) {
  enum { SMALL = 8, LARGE = 2000000, LAT_ITERS = 2000, BW_ITERS = 20 };
  char *buf = calloc(1, LARGE);
  int peer;
  if (!buf) MPI_Abort(MPI_COMM_WORLD, 3);
  for (peer = 1; peer < size; peer++) {
    double lat, bw;
    round_trips(rank, peer, buf, SMALL, 100); /* warm-up: connections, caches */
    lat = round_trips(rank, peer, buf, SMALL, LAT_ITERS) / (2.0 * LAT_ITERS) * 1e6;
    round_trips(rank, peer, buf, LARGE, 2);
    bw = 2.0 * LARGE * BW_ITERS / round_trips(rank, peer, buf, LARGE, BW_ITERS) / 1e6;
    if (rank == 0)
      printf("pingpong %d latency_us %.3f bandwidth_MBps %.3f\n", peer, lat, bw);
  }
  fflush(stdout);
  free(buf);
}

int main(int argc, char **argv) {
  HPL_RuntimeData rdata;
  int failure = 0, rank, size;
  MPI_Init(&argc, &argv);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  ping_pong(rank, size);
  HPL_main(argc, argv, &rdata, &failure);
  MPI_Finalize();
  return failure ? 1 : 0;
}
