/*
 * kshim.h: the kernel interfaces that Linux's drivers/iommu/iova.c and lib/rbtree.c use,
 * written for busdma's lab so both files build unchanged in userspace (`-include kshim.h`).
 * It holds no kernel code. What each stand-in costs, next to the kernel's:
 *
 * - spinlock_t: 4 bytes, acquired by one compare-and-swap from 0 to 1 (the fast path of the
 *   kernel's queued spinlock, `lock cmpxchg` on x86), spun on out of line when taken, and
 *   released by a release store (the kernel's `movb $0`). `spin_lock_irqsave` does NOT save
 *   and disable interrupts (no pushf/cli/popf) and nothing counts preemption: Linux pays those
 *   on top of what this build measures.
 * - Per-CPU data: the calling thread's `lab_cpu` (thread-local, set by the harness) indexes
 *   areas `LAB_PERCPU_STRIDE` bytes apart, so no two CPUs' data share a cache line.
 * - kmem_cache: SLUB's fast path, a free list per CPU without a lock (malloc when it is
 *   empty). The cached pair never allocates; the tree-alone pair allocates and frees one
 *   `struct iova` per pair. (glibc's aligned malloc here cost ~600 of ~1 070 instructions
 *   per tree pair: not the kernel's cost.)
 * - Delayed work (the depot trimmer) and CPU hotplug callbacks never run.
 */
#ifndef LAB_KSHIM_H
#define LAB_KSHIM_H

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef uint64_t dma_addr_t;
typedef unsigned int gfp_t;
typedef uint32_t u32;
typedef uint64_t u64;

#define PAGE_SHIFT 12
#define PAGE_SIZE (1UL << PAGE_SHIFT)
#define IS_REACHABLE(option) 1

#undef __always_inline
#define __always_inline inline __attribute__((always_inline))
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define READ_ONCE(x) (*(const volatile __typeof__(x) *)&(x))
#define WRITE_ONCE(x, val) do { *(volatile __typeof__(x) *)&(x) = (val); } while (0)
#define rcu_assign_pointer(p, v) __atomic_store_n(&(p), (v), __ATOMIC_RELEASE)
#define rcu_dereference_raw(p) READ_ONCE(p)
#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))
#define static_assert(expr, ...) _Static_assert(expr, #expr)

#define EXPORT_SYMBOL(sym)
#define EXPORT_SYMBOL_GPL(sym)
#define MODULE_AUTHOR(s)
#define MODULE_DESCRIPTION(s)
#define MODULE_LICENSE(s)

#define BUG_ON(cond) do { if (unlikely(cond)) { fprintf(stderr, "BUG at %s:%d\n", __FILE__, __LINE__); abort(); } } while (0)
#define WARN_ON(cond) ({ bool w_ = !!(cond); if (unlikely(w_)) fprintf(stderr, "WARN at %s:%d\n", __FILE__, __LINE__); w_; })
#define pr_err(...) fprintf(stderr, __VA_ARGS__)
#define ERR_PTR(err) ((void *)(long)(err))

#define min(a, b) ((a) < (b) ? (a) : (b))
#define swap(a, b) do { __typeof__(a) t_ = (a); (a) = (b); (b) = t_; } while (0)
#define ALIGN(x, a) (((x) + ((a) - 1)) & ~((__typeof__(x))(a) - 1))
#define ALIGN_DOWN(x, a) ((x) & ~((__typeof__(x))(a) - 1))

/* Bit operations, as the kernel defines them (x86: bsf/bsr). */
static inline unsigned long __ffs(unsigned long x) { return (unsigned long)__builtin_ctzl(x); }
static inline unsigned int fls_long(unsigned long x) { return x ? 64 - (unsigned int)__builtin_clzl(x) : 0; }
static inline bool is_power_of_2(unsigned long n) { return n != 0 && (n & (n - 1)) == 0; }
static inline unsigned long roundup_pow_of_two(unsigned long n) { return 1UL << fls_long(n - 1); }
#define order_base_2(n) ((n) > 1 ? fls_long((n) - 1) : 0)

/* Locks. */
typedef struct { int val; } spinlock_t;
void lab_spin_contended(spinlock_t *lock);
static inline void spin_lock_init(spinlock_t *lock) { lock->val = 0; }
static inline void spin_lock(spinlock_t *lock)
{
	int expected = 0;
	if (likely(__atomic_compare_exchange_n(&lock->val, &expected, 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)))
		return;
	lab_spin_contended(lock);
}
static inline void spin_unlock(spinlock_t *lock) { __atomic_store_n(&lock->val, 0, __ATOMIC_RELEASE); }
#define spin_lock_irqsave(lock, flags) do { (flags) = 0; spin_lock(lock); } while (0)
#define spin_unlock_irqrestore(lock, flags) do { (void)(flags); spin_unlock(lock); } while (0)
#define assert_spin_locked(lock) BUG_ON(!__atomic_load_n(&(lock)->val, __ATOMIC_RELAXED))

struct mutex { pthread_mutex_t m; };
#define DEFINE_MUTEX(name) struct mutex name = { PTHREAD_MUTEX_INITIALIZER }
#define mutex_lock(x) pthread_mutex_lock(&(x)->m)
#define mutex_unlock(x) pthread_mutex_unlock(&(x)->m)

/* Allocation. */
#define GFP_KERNEL 0u
#define GFP_ATOMIC 0u
#define __GFP_NOWARN 0u
#define SLAB_HWCACHE_ALIGN 0u
/* A slab cache as SLUB's fast path: a LIFO free list per CPU (each on its own line), no lock;
 * an empty list falls back to malloc. Objects are never given back to malloc. */
#define LAB_MAX_CPUS 64
struct lab_freelist { void *head; char pad[56]; };
struct kmem_cache { struct lab_freelist cpu[LAB_MAX_CPUS]; size_t size; };
extern __thread unsigned int lab_cpu;
static inline void *lab_alloc(size_t size)
{
	return aligned_alloc(64, (size + 63) & ~(size_t)63);
}
static inline struct kmem_cache *kmem_cache_create(const char *name, size_t size, size_t align,
						   unsigned int flags, void *ctor)
{
	struct kmem_cache *c = lab_alloc(sizeof(*c));
	(void)name; (void)align; (void)flags; (void)ctor;
	if (c) {
		memset(c, 0, sizeof(*c));
		c->size = size < sizeof(void *) ? sizeof(void *) : size;
	}
	return c;
}
static inline void kmem_cache_destroy(struct kmem_cache *c) { free(c); }
static inline void *kmem_cache_alloc(struct kmem_cache *c, gfp_t gfp)
{
	void **head = &c->cpu[lab_cpu].head, *p = *head;
	(void)gfp;
	if (likely(p)) {
		*head = *(void **)p;
		return p;
	}
	return lab_alloc(c->size);
}
static inline void *kmem_cache_zalloc(struct kmem_cache *c, gfp_t gfp)
{
	void *p = kmem_cache_alloc(c, gfp);
	if (p)
		memset(p, 0, c->size);
	return p;
}
static inline void kmem_cache_free(struct kmem_cache *c, void *p)
{
	void **head = &c->cpu[lab_cpu].head;
	*(void **)p = *head;
	*head = p;
}
static inline void *kcalloc(size_t n, size_t size, gfp_t gfp) { (void)gfp; return calloc(n, size); }
static inline void *kzalloc(size_t size, gfp_t gfp) { (void)gfp; return calloc(1, size); }
static inline void kfree(void *p) { free(p); }

/* Per-CPU data: thread `lab_cpu`'s area among `lab_ncpus` (at most LAB_MAX_CPUS). */
#define __percpu
#define LAB_PERCPU_STRIDE 256
extern unsigned int lab_ncpus;
static inline void *__alloc_percpu(size_t size, size_t align)
{
	void *p;
	(void)align;
	if (size > LAB_PERCPU_STRIDE)
		return NULL;
	p = aligned_alloc(4096, (size_t)LAB_PERCPU_STRIDE * lab_ncpus + 4096);
	if (p)
		memset(p, 0, (size_t)LAB_PERCPU_STRIDE * lab_ncpus);
	return p;
}
static inline void free_percpu(void *p) { free(p); }
#define per_cpu_ptr(p, cpu) ((__typeof__(p))((char *)(p) + (size_t)(cpu) * LAB_PERCPU_STRIDE))
#define raw_cpu_ptr(p) per_cpu_ptr(p, lab_cpu)
#define cache_line_size() 64
#define for_each_possible_cpu(cpu) for ((cpu) = 0; (cpu) < lab_ncpus; (cpu)++)
#define for_each_online_cpu(cpu) for_each_possible_cpu(cpu)
#define num_online_cpus() lab_ncpus

/* Deferred work and CPU hotplug: never run here. */
struct work_struct { int unused; };
struct delayed_work { struct work_struct work; };
#define INIT_DELAYED_WORK(w, fn) ((void)(w), (void)(fn))
static inline bool lab_no_work(void *w) { (void)w; return true; }
#define schedule_delayed_work(w, delay) lab_no_work(w)
#define cancel_delayed_work_sync(w) lab_no_work(w)
#define msecs_to_jiffies(ms) (ms)
struct hlist_node { struct hlist_node *next, **pprev; };
#define hlist_entry_safe(ptr, type, member) ((ptr) ? container_of(ptr, type, member) : NULL)
#define CPUHP_IOMMU_IOVA_DEAD 0
#define cpuhp_setup_state_multi(state, name, up, down) ((void)(down), 0)
#define cpuhp_remove_multi_state(state) ((void)0)
#define cpuhp_state_add_instance_nocalls(state, node) 0
#define cpuhp_state_remove_instance_nocalls(state, node) ((void)0)

#endif
