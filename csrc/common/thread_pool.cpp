#include "common/thread_pool.h"

#ifdef PYOPS_USE_OPENMP
#include <omp.h>
#endif

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace pyops {
#ifndef PYOPS_USE_OPENMP
namespace {

// Spin this long for the next job (or for the helpers to finish) before sleeping on a condition
// variable: waking a sleeping thread costs tens of microseconds, which is the whole run time of a
// small kernel, and training loops call the kernels back to back (forward, a few hundred
// microseconds of autograd, backward). OpenMP runtimes spin for the same reason.
constexpr auto kSpin = std::chrono::microseconds(300);

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

// Spins until pred() or kSpin has passed; returns pred().
template <typename Pred>
bool spin_until(Pred pred) {
  const auto deadline = std::chrono::steady_clock::now() + kSpin;
  for (int n = 0;; ++n) {
    if (pred()) return true;
    cpu_relax();
    if ((n & 63) == 63 && std::chrono::steady_clock::now() > deadline) return pred();
  }
}

class Pool {
 public:
  ~Pool() = delete;  // pools are leaked on purpose: see reset_after_fork

  void run(int64_t n_items, int n_threads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    const int helpers = (int)std::min<int64_t>(n_threads, n_items) - 1;
    if (!busy.owns_lock() || helpers <= 0) {
      for (int64_t i = 0; i < n_items; ++i) fn(i);
      return;
    }
    ensure_workers(helpers);
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &fn;
      n_items_ = n_items;
      next_.store(0);
      active_helpers_ = helpers;
      pending_.store(helpers);
      generation_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    drain();
    if (!spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; })) {
      std::unique_lock<std::mutex> lk(mu_);
      done_cv_.wait(lk, [&] { return pending_.load(std::memory_order_acquire) == 0; });
    }
    std::lock_guard<std::mutex> lk(mu_);
    job_ = nullptr;
  }

 private:
  void drain() {
    const std::function<void(int64_t)>& fn = *job_;
    for (int64_t i = next_.fetch_add(1); i < n_items_; i = next_.fetch_add(1)) fn(i);
  }

  void ensure_workers(int n) {
    while ((int)workers_ < n) {
      const int index = (int)workers_++;
      uint64_t start;
      {
        std::lock_guard<std::mutex> lk(mu_);
        start = generation_.load();  // a new worker waits for the next job, never replays an old one
      }
      std::thread([this, index, start] { worker(index, start); }).detach();
    }
  }

  void worker(int index, uint64_t seen) {
    for (;;) {
      const auto moved = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      {
        // The job fields are read under the lock that run() wrote them under.
        std::unique_lock<std::mutex> lk(mu_, std::defer_lock);
        if (spin_until(moved)) {
          lk.lock();
        } else {
          lk.lock();
          cv_.wait(lk, moved);
        }
        seen = generation_.load();
        if (index >= active_helpers_) continue;
      }
      drain();
      if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
        std::lock_guard<std::mutex> lk(mu_);  // the waiter checks pending_ under this lock
        done_cv_.notify_one();
      }
    }
  }

  std::mutex busy_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t n_items_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<uint64_t> generation_{0};
  int active_helpers_ = 0;
  std::atomic<int> pending_{0};
  size_t workers_ = 0;
};

std::atomic<Pool*> g_pool{nullptr};

// After fork the child has no worker threads; the parent's pool object may even hold locked
// mutexes. Leak it and let the child build a new one on first use.
void reset_after_fork() { g_pool.store(nullptr); }

Pool& pool() {
  static std::once_flag once;
  std::call_once(once, [] { pthread_atfork(nullptr, nullptr, reset_after_fork); });
  Pool* p = g_pool.load();
  if (p == nullptr) {
    Pool* fresh = new Pool();
    if (g_pool.compare_exchange_strong(p, fresh)) {
      p = fresh;
    } else {
      p = g_pool.load();  // another thread won; `fresh` is leaked, as pools always are
    }
  }
  return *p;
}

}  // namespace
#endif

int hardware_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

#ifdef PYOPS_USE_OPENMP
// The kernels run on torch's own OpenMP threads when the extension is built with OpenMP: the
// module links libgomp.so.1, and since torch is imported first the loader resolves that to the
// copy torch already loaded, so there is one thread team in the process. A private pool would
// share the cores with torch's OpenMP workers, which spin for a while after every torch op (so a
// kernel right after a GEMM would compete with them for the cores), and vice versa.
// Fork: like torch's own ops, a child of a parent that ran a parallel region must use one thread
// (torch's DataLoader workers do: torch.set_num_threads(1)).
void parallel_for(int64_t n_items, int n_threads, const std::function<void(int64_t)>& fn) {
  if (n_items <= 0) return;
  const int team = (int)std::min<int64_t>(std::max(1, n_threads), n_items);
  if (team == 1 || omp_in_parallel()) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(team)
  {
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) fn(i);
  }
}
#else
void parallel_for(int64_t n_items, int n_threads, const std::function<void(int64_t)>& fn) {
  if (n_items <= 0) return;
  n_threads = std::max(1, n_threads);
  if (n_threads == 1 || n_items == 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
  pool().run(n_items, n_threads, fn);
}
#endif

}  // namespace pyops
