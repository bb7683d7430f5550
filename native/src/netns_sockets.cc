// SPDX-License-Identifier: Apache-2.0
#include "netns_sockets.h"

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <condition_variable>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "common.h"

namespace nodemesh {

namespace {

struct Request {
  int family = 0;
  int fd = -1;
  SysError error;
  bool failed = false;
  bool done = false;
};

class NetnsThread {
 public:
  explicit NetnsThread(const std::string& path) : path_(path) {
    std::unique_lock<std::mutex> lock(mu_);
    thread_ = std::thread([this]() { Run(); });
    cv_.wait(lock, [this]() { return started_; });
  }

  ~NetnsThread() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  int MakeSocket(int family) {
    std::unique_lock<std::mutex> lock(mu_);
    if (startFailed_) throw startError_;
    Request req;
    req.family = family;
    queue_.push_back(&req);
    cv_.notify_all();
    cv_.wait(lock, [&req]() { return req.done; });
    if (req.failed) throw req.error;
    return req.fd;
  }

 private:
  void Run() {
    int target = open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    bool ok = target >= 0 && setns(target, CLONE_NEWNET) == 0;
    int err = errno;
    if (target >= 0) close(target);
    std::unique_lock<std::mutex> lock(mu_);
    started_ = true;
    if (!ok) {
      startFailed_ = true;
      startError_ = {err, target < 0 ? "open" : "setns", path_, ""};
    }
    cv_.notify_all();
    if (!ok) return;  // this thread never entered the netns; it just ends
    while (true) {
      cv_.wait(lock, [this]() { return stop_ || !queue_.empty(); });
      if (stop_) break;
      while (!queue_.empty()) {
        Request* req = queue_.front();
        queue_.pop_front();
        req->fd = socket(req->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (req->fd < 0) {
          req->failed = true;
          req->error = {errno, "socket", path_, ""};
        }
        req->done = true;
      }
      cv_.notify_all();
    }
    // Requests that raced with stop are answered, not left waiting.
    for (Request* req : queue_) {
      req->failed = true;
      req->error = {ESHUTDOWN, "socket", path_, ""};
      req->done = true;
    }
    queue_.clear();
    cv_.notify_all();
  }

  std::string path_;
  std::thread thread_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Request*> queue_;
  bool started_ = false;
  bool startFailed_ = false;
  SysError startError_;
  bool stop_ = false;
};

struct Entry {
  ino_t inode;
  std::shared_ptr<NetnsThread> thread;
};

std::mutex registryMu;
std::map<std::string, Entry> registry;

// The thread for the netns now at `path`. A path can be reused by a new pod (same name, new
// netns): the inode tells them apart, and the old namespace's thread is dropped.
std::shared_ptr<NetnsThread> ThreadFor(const std::string& path) {
  struct stat st = {};
  if (stat(path.c_str(), &st) != 0) ThrowSys(errno, "stat", path);
  std::lock_guard<std::mutex> lock(registryMu);
  auto it = registry.find(path);
  if (it != registry.end() && it->second.inode == st.st_ino) return it->second.thread;
  auto t = std::make_shared<NetnsThread>(path);
  registry[path] = Entry{st.st_ino, t};
  return t;
}

}  // namespace

int NetnsSocket(const std::string& nsPath, int family) {
  std::shared_ptr<NetnsThread> t = ThreadFor(nsPath);
  try {
    return t->MakeSocket(family);
  } catch (const SysError& e) {
    // A netns that could not be entered is not remembered: the path may be valid next time.
    if (e.syscall != "socket") ReleaseNetns(nsPath);
    throw;
  }
}

bool ReleaseNetns(const std::string& nsPath) {
  std::shared_ptr<NetnsThread> t;
  {
    std::lock_guard<std::mutex> lock(registryMu);
    auto it = registry.find(nsPath);
    if (it == registry.end()) return false;
    t = it->second.thread;
    registry.erase(it);
  }
  return true;  // the thread ends when the last user drops its reference
}

}  // namespace nodemesh
