#include "common/thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace pyops {
namespace {

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
      pending_ = helpers;
      ++generation_;
    }
    cv_.notify_all();
    drain();
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [&] { return pending_ == 0; });
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
        start = generation_;  // a new worker waits for the next job, never replays an old one
      }
      std::thread([this, index, start] { worker(index, start); }).detach();
    }
  }

  void worker(int index, uint64_t seen) {
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (index >= active_helpers_) continue;
      }
      drain();
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex busy_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t n_items_ = 0;
  std::atomic<int64_t> next_{0};
  uint64_t generation_ = 0;
  int active_helpers_ = 0;
  int pending_ = 0;
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

int hardware_threads() { return std::max(1u, std::thread::hardware_concurrency()); }

void parallel_for(int64_t n_items, int n_threads, const std::function<void(int64_t)>& fn) {
  if (n_items <= 0) return;
  n_threads = std::max(1, n_threads);
  if (n_threads == 1 || n_items == 1) {
    for (int64_t i = 0; i < n_items; ++i) fn(i);
    return;
  }
  pool().run(n_items, n_threads, fn);
}

}  // namespace pyops
