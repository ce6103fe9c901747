/*
 * Harness for Linux's IOVA allocator (drivers/iommu/iova.c, built unchanged against kshim.h),
 * running the loops busdma's lab runs on its own allocator, so `lab/linux-iova/run` can print
 * both side by side. The space is busdma's lab space: [1 MiB, 1 TiB) in 4 KiB pages.
 *
 *   harness pair PAGES N        N alloc_iova_fast + free_iova_fast pairs of PAGES pages on CPU 0
 *                               (the per-CPU cache; `icount iova` / `icount_iova pair-1`)
 *   harness tree LIVE N         N alloc_iova + free_iova pairs of 1 page, no caches, among LIVE
 *                               live 1-page ranges separated by 1-page holes (`icount_iova tree-1k`)
 *   harness tree-ring LIVE N    the same space, a ring of 16: each step frees the oldest range
 *                               and allocates one (`icount_iova tree-ring-1k`)
 *   harness bench CACHES LIVE PAGES RING THREADS MILLIS
 *                               timed, like `dmalab bench iova`: each thread (its own CPU) allocates
 *                               PAGES pages and frees the range it allocated RING steps earlier,
 *                               checking a stop flag every 32 steps after 2 000 untimed ones;
 *                               CACHES 1 = alloc_iova_fast/free_iova_fast, 0 = the tree alone
 *
 * The hot loops are `hot_*` functions (callgrind: --toggle-collect='hot_*'); each mode prints
 * one JSON line with the loop's wall and thread-CPU nanoseconds per pair.
 */
#include <linux/iova.h>
#include <sched.h>
#include <time.h>

__thread unsigned int lab_cpu;
unsigned int lab_ncpus = 2;

void lab_spin_contended(spinlock_t *lock)
{
	int expected;
	do {
		while (__atomic_load_n(&lock->val, __ATOMIC_RELAXED))
			__builtin_ia32_pause();
		expected = 0;
	} while (!__atomic_compare_exchange_n(&lock->val, &expected, 1, false, __ATOMIC_ACQUIRE,
					      __ATOMIC_RELAXED));
}

#define START_PFN ((1UL << 20) >> PAGE_SHIFT)
#define LIMIT_PFN (((1UL << 40) >> PAGE_SHIFT) - 1)

static struct iova_domain dom;

static double now_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (double)ts.tv_sec * 1e9 + (double)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "harness: %s\n", what);
	exit(1);
}

static void setup(bool caches, unsigned long live)
{
	if (iova_cache_get())
		die("iova_cache_get");
	init_iova_domain(&dom, PAGE_SIZE, START_PFN);
	if (caches && iova_domain_init_rcaches(&dom))
		die("iova_domain_init_rcaches");
	/* 2 LIVE 1-page ranges from the top, then every second one freed: LIVE holes. */
	unsigned long *pfns = calloc(2 * live + 1, sizeof(*pfns));
	for (unsigned long i = 0; i < 2 * live; i++) {
		struct iova *v = alloc_iova(&dom, 1, LIMIT_PFN, true);
		if (!v)
			die("layout alloc_iova");
		pfns[i] = v->pfn_lo;
	}
	for (unsigned long i = 1; i < 2 * live; i += 2)
		free_iova(&dom, pfns[i]);
	free(pfns);
}

__attribute__((noinline)) static void hot_pair(unsigned long pages, unsigned long n)
{
	for (unsigned long i = 0; i < n; i++) {
		unsigned long pfn = alloc_iova_fast(&dom, pages, LIMIT_PFN, true);
		if (unlikely(!pfn))
			die("alloc_iova_fast");
		free_iova_fast(&dom, pfn, pages);
	}
}

__attribute__((noinline)) static void hot_tree(unsigned long n)
{
	for (unsigned long i = 0; i < n; i++) {
		struct iova *v = alloc_iova(&dom, 1, LIMIT_PFN, true);
		if (unlikely(!v))
			die("alloc_iova");
		free_iova(&dom, v->pfn_lo);
	}
}

__attribute__((noinline)) static void hot_ring(unsigned long *ring, unsigned long n)
{
	for (unsigned long i = 0; i < n; i++) {
		unsigned long *slot = &ring[i % 16];
		if (*slot)
			free_iova(&dom, *slot);
		struct iova *v = alloc_iova(&dom, 1, LIMIT_PFN, true);
		if (unlikely(!v))
			die("alloc_iova");
		*slot = v->pfn_lo;
	}
}

static void report(const char *mode, unsigned long pages, unsigned long live, unsigned long threads,
		   double pairs, double wall, double cpu)
{
	printf("{\"impl\":\"linux\",\"mode\":\"%s\",\"pages\":%lu,\"live\":%lu,\"threads\":%lu,"
	       "\"pairs\":%.0f,\"ns_per_op\":%.2f,\"cpu_ns_per_op\":%.2f}\n",
	       mode, pages, live, threads, pairs, wall / pairs, cpu / pairs);
}

/* Timed mode. */
struct bench {
	bool caches;
	unsigned long pages, ring;
	volatile bool stop;
	pthread_barrier_t go;
};
struct worker {
	struct bench *b;
	pthread_t th;
	unsigned int cpu;
	unsigned long pairs;
	double end, cpu_ns;
};

static unsigned long bench_alloc(struct bench *b)
{
	if (b->caches)
		return alloc_iova_fast(&dom, b->pages, LIMIT_PFN, true);
	struct iova *v = alloc_iova(&dom, b->pages, LIMIT_PFN, true);
	return v ? v->pfn_lo : 0;
}

static void bench_free(struct bench *b, unsigned long pfn)
{
	if (b->caches)
		free_iova_fast(&dom, pfn, b->pages);
	else
		free_iova(&dom, pfn);
}

__attribute__((noinline)) static void hot_step(struct bench *b, unsigned long *ring, unsigned long *head,
					       unsigned long *len)
{
	unsigned long cap = b->ring + 1;
	unsigned long pfn = bench_alloc(b);
	if (unlikely(!pfn))
		die("bench alloc");
	ring[(*head + *len) % cap] = pfn;
	if (++*len > b->ring) {
		bench_free(b, ring[*head]);
		*head = (*head + 1) % cap;
		--*len;
	}
}

static void *worker_main(void *arg)
{
	struct worker *w = arg;
	struct bench *b = w->b;
	unsigned long *ring = calloc(b->ring + 1, sizeof(*ring)), head = 0, len = 0, n = 0;
	lab_cpu = w->cpu;
	for (int i = 0; i < 2000; i++)
		hot_step(b, ring, &head, &len);
	pthread_barrier_wait(&b->go);
	double cpu0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
	do {
		for (int i = 0; i < 32; i++)
			hot_step(b, ring, &head, &len);
		n += 32;
	} while (!b->stop);
	w->end = now_ns(CLOCK_MONOTONIC);
	w->cpu_ns = now_ns(CLOCK_THREAD_CPUTIME_ID) - cpu0;
	w->pairs = n;
	for (; len; len--, head = (head + 1) % (b->ring + 1))
		bench_free(b, ring[head]);
	free(ring);
	return NULL;
}

static void bench(bool caches, unsigned long live, unsigned long pages, unsigned long ring,
		  unsigned long threads, unsigned long millis)
{
	struct bench b = { .caches = caches, .pages = pages, .ring = ring ? ring : 1 };
	struct worker *ws = calloc(threads, sizeof(*ws));
	if (threads > LAB_MAX_CPUS)
		die("more threads than LAB_MAX_CPUS");
	lab_ncpus = threads;
	setup(caches, live);
	pthread_barrier_init(&b.go, NULL, (unsigned int)threads + 1);
	for (unsigned long t = 0; t < threads; t++) {
		ws[t] = (struct worker){ .b = &b, .cpu = (unsigned int)t };
		if (pthread_create(&ws[t].th, NULL, worker_main, &ws[t]))
			die("pthread_create");
	}
	pthread_barrier_wait(&b.go);
	double start = now_ns(CLOCK_MONOTONIC);
	struct timespec d = { .tv_sec = (time_t)(millis / 1000), .tv_nsec = (long)(millis % 1000) * 1000000 };
	nanosleep(&d, NULL);
	b.stop = true;
	double last = start, cpu = 0, pairs = 0;
	for (unsigned long t = 0; t < threads; t++) {
		pthread_join(ws[t].th, NULL);
		last = ws[t].end > last ? ws[t].end : last;
		cpu += ws[t].cpu_ns;
		pairs += (double)ws[t].pairs;
	}
	report(caches ? "bench-cache" : "bench-tree", pages, live, threads, pairs, last - start, cpu);
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "";
	unsigned long a[6] = { 0 };
	for (int i = 2; i < argc && i < 8; i++)
		a[i - 2] = strtoul(argv[i], NULL, 0);
	double w0, c0;
	if (!strcmp(mode, "pair") && argc == 4) {
		setup(true, 0);
		hot_pair(a[0], 64);
		w0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
		hot_pair(a[0], a[1]);
		report(mode, a[0], 0, 1, (double)a[1], now_ns(CLOCK_MONOTONIC) - w0,
		       now_ns(CLOCK_THREAD_CPUTIME_ID) - c0);
	} else if ((!strcmp(mode, "tree") || !strcmp(mode, "tree-ring")) && argc == 4) {
		unsigned long ring[16] = { 0 };
		setup(false, a[0]);
		w0 = now_ns(CLOCK_MONOTONIC), c0 = now_ns(CLOCK_THREAD_CPUTIME_ID);
		if (mode[4])
			hot_ring(ring, a[1]);
		else
			hot_tree(a[1]);
		report(mode, 1, a[0], 1, (double)a[1], now_ns(CLOCK_MONOTONIC) - w0,
		       now_ns(CLOCK_THREAD_CPUTIME_ID) - c0);
	} else if (!strcmp(mode, "bench") && argc == 8 && a[4] > 0) {
		bench(a[0] != 0, a[1], a[2], a[3], a[4], a[5]);
	} else {
		fprintf(stderr, "usage: harness pair PAGES N | tree LIVE N | tree-ring LIVE N |\n"
				"       bench CACHES LIVE PAGES RING THREADS MILLIS\n");
		return 2;
	}
	return 0;
}
