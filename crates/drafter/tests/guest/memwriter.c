/* A guest program for migration tests: rewrites a working set of W MiB at R
 * MiB/s and prints a two-byte heartbeat line every 20 ms. Every page carries
 * its index, a generation (how often it was rewritten) and words derived from
 * both; each page is checked before it is rewritten against the generation
 * it must have, so memory that was lost, stale or mixed up in a migration
 * shows as a "BAD" line. Every 50 heartbeats it prints "V <pages checked>
 * <bad pages>".
 *
 * Usage: memwriter WORKING_SET_MIB RATE_MIB_PER_S
 * Built static (cc -O2 -static) for a busybox initramfs. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096
#define WORDS (PAGE / 8)

static uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

static uint64_t word(uint64_t page, uint64_t gen, int k) {
    return mix(page * 131 + (uint64_t)k + gen * 7919);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void fill(uint64_t *p, uint64_t page, uint64_t gen) {
    p[0] = page;
    p[1] = gen;
    for (int k = 2; k < WORDS; k++)
        p[k] = word(page, gen, k);
}

static int intact(const uint64_t *p, uint64_t page, uint64_t gen) {
    if (p[0] != page || p[1] != gen)
        return 0;
    for (int k = 2; k < WORDS; k++)
        if (p[k] != word(page, gen, k))
            return 0;
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fputs("usage: memwriter WORKING_SET_MIB RATE_MIB_PER_S\n", stderr);
        return 2;
    }
    size_t pages = ((size_t)atol(argv[1]) << 20) / PAGE;
    double rate = atof(argv[2]) * 1048576.0;
    uint64_t *mem = malloc(pages * PAGE);
    if (!mem || pages == 0) {
        puts("WRITER-NOMEM");
        return 1;
    }
    for (size_t i = 0; i < pages; i++)
        fill(mem + i * WORDS, i, 0);
    printf("WRITER-READY %zu pages\n", pages);
    fflush(stdout);
    size_t cur = 0;
    uint64_t passes = 0; /* page i was rewritten passes + (i < cur) times */
    unsigned long checked = 0, bad = 0, beat = 0;
    double debt = 0, next = now() + 0.02;
    for (;;) {
        for (debt += rate * 0.02; debt >= PAGE; debt -= PAGE) {
            uint64_t *p = mem + cur * WORDS;
            checked++;
            if (!intact(p, cur, passes) && ++bad <= 5)
                printf("BAD page %zu gen %lu want %lu\n", cur, (unsigned long)p[1],
                       (unsigned long)passes);
            fill(p, cur, passes + 1);
            if (++cur == pages) {
                cur = 0;
                passes++;
            }
        }
        beat++;
        printf("%c\n", 'a' + (int)(beat % 26));
        if (beat % 50 == 0)
            printf("V %lu %lu\n", checked, bad);
        fflush(stdout);
        double t = now();
        if (next > t)
            usleep((useconds_t)((next - t) * 1e6));
        next += 0.02;
        if (next < now())
            next = now() + 0.02;
    }
}
