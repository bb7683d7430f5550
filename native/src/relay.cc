// SPDX-License-Identifier: Apache-2.0
// The byte-copying half of the proxy, in the kernel: one thread with epoll moves bytes between
// the two sockets of each proxied connection with splice() through a pipe per direction, so no
// byte passes through JavaScript. Backpressure: a direction stops reading while its pipe still
// holds bytes the other side could not take. Half-close: EOF on one side, once its pipe is
// drained, becomes shutdown(SHUT_WR) on the other. The connection ends when both directions have
// ended, on an error, or after the idle timeout; JS then gets the byte counts.
#include <errno.h>
#include <fcntl.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "common.h"

// GCC 12 reports a use-after-free in the inlined event loop that is not there: a connection is
// only reached through conns_.find(id) after Finish() erased it, and that lookup fails.
#pragma GCC diagnostic ignored "-Wuse-after-free"

namespace nodemesh {

namespace {

constexpr size_t kChunk = 1 << 20;

using Clock = std::chrono::steady_clock;

struct Direction {
  int from = -1, to = -1;
  int pipeR = -1, pipeW = -1;
  size_t inPipe = 0;
  uint64_t bytes = 0;
  bool eof = false;       // read side ended
  bool shutDown = false;  // we sent SHUT_WR to `to`
};

struct Done {
  uint64_t id;
  uint64_t aToB, bToA;
  std::string error;
  std::string reason;
};

struct Conn {
  uint64_t id = 0;
  int a = -1, b = -1;
  Direction ab, ba;
  int idleMs = 0;
  Clock::time_point last;
  std::string error;
  // Why it ended, when not by both sides closing: reset, error, idle_timeout, proxy_stopping.
  std::string reason;
  // A side failed (a reset, an error): both are closed with a reset (SO_LINGER {1, 0}), so the
  // other peer sees the connection fail instead of a clean end of stream.
  bool reset = false;
  // Which sockets EPOLLOUT is asked for on: only while bytes wait in the pipe toward them.
  bool outA = false, outB = false;
};

// A socket whose non-blocking connect() is in progress, waited for on the relay thread (never on
// a libuv pool thread: a destination that drops SYNs would hold one for the whole timeout).
struct Wait {
  uint64_t id = 0;
  int fd = -1;
  Clock::time_point deadline;
};

struct WaitDone {
  uint64_t id;
  int err;  // 0: connected; else connect's errno (ETIMEDOUT at the deadline)
};

class RelayEngine {
 public:
  static RelayEngine& Get(Napi::Env env) {
    static RelayEngine* engine = nullptr;
    if (!engine) engine = new RelayEngine(env);
    return *engine;
  }

  // Ends every relayed connection (the proxy is stopping); their Promises resolve with an error.
  void AbortAll() {
    abort_ = true;
    Wake();
  }

  // Resolves with 0 once fd's connect() has completed, or with its errno. The fd stays the caller's.
  Napi::Promise WaitConnected(Napi::Env env, int fd, int timeoutMs) {
    auto deferred = Napi::Promise::Deferred::New(env);
    uint64_t id = ++nextId_;
    waitPending_.emplace(id, deferred);
    auto w = std::make_unique<Wait>();
    w->id = id;
    w->fd = fd;
    w->deadline = Clock::now() + std::chrono::milliseconds(timeoutMs);
    {
      std::lock_guard<std::mutex> lock(mu_);
      incomingWaits_.push_back(std::move(w));
    }
    Wake();
    Hold(env);
    return deferred.Promise();
  }

  Napi::Promise Add(Napi::Env env, int a, int b, int idleMs) {
    auto deferred = Napi::Promise::Deferred::New(env);
    uint64_t id = ++nextId_;
    pending_.emplace(id, deferred);
    auto c = std::make_unique<Conn>();
    c->id = id;
    c->a = a;
    c->b = b;
    c->idleMs = idleMs;
    std::string failed;
    if (!SetUp(*c, failed)) {
      Close(*c);
      Done d{id, 0, 0, failed};
      Settle(env, d);
      return deferred.Promise();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      incoming_.push_back(std::move(c));
    }
    Wake();
    Hold(env);
    return deferred.Promise();
  }

 private:
  // Wakes the loop for new work (it also wakes at least once a second, so a failed write is only late).
  void Wake() {
    uint64_t one = 1;
    if (write(wake_, &one, sizeof(one)) < 0) {
      // picked up within a second anyway
    }
  }

  // One more piece of work the JS side waits for: the process stays alive until it is settled.
  void Hold(Napi::Env env) {
    tsfn_.Ref(env);
    active_++;
  }

  explicit RelayEngine(Napi::Env env) {
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    wake_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epoll_event ev = {};
    ev.events = EPOLLIN;
    ev.data.u64 = 0;
    epoll_ctl(epfd_, EPOLL_CTL_ADD, wake_, &ev);
    tsfn_ = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "nodemesh.relay", 0, 1);
    tsfn_.Unref(env);
    thread_ = std::thread([this]() { Loop(); });
    thread_.detach();
  }

  static bool SetUp(Conn& c, std::string& failed) {
    for (Direction* d : {&c.ab, &c.ba}) {
      int p[2];
      if (pipe2(p, O_NONBLOCK | O_CLOEXEC) != 0) {
        failed = std::string("pipe2: ") + strerror(errno);
        return false;
      }
      d->pipeR = p[0];
      d->pipeW = p[1];
      fcntl(d->pipeW, F_SETPIPE_SZ, kChunk);
    }
    c.ab.from = c.a;
    c.ab.to = c.b;
    c.ba.from = c.b;
    c.ba.to = c.a;
    for (int fd : {c.a, c.b}) {
      int flags = fcntl(fd, F_GETFL);
      fcntl(fd, F_SETFL, flags | O_NONBLOCK);
    }
    c.last = Clock::now();
    return true;
  }

  static void Close(Conn& c) {
    if (c.reset) {
      struct linger lg = {1, 0};
      for (int fd : {c.a, c.b}) {
        if (fd >= 0) setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
      }
    }
    for (int* fd : {&c.a, &c.b, &c.ab.pipeR, &c.ab.pipeW, &c.ba.pipeR, &c.ba.pipeW}) {
      if (*fd >= 0) close(*fd);
      *fd = -1;
    }
  }

  // Edge-triggered: every readiness change of either socket pumps both directions as far as
  // they go (until EAGAIN, EOF or a full pipe), so no edge is missed, and a hang-up is reported
  // once instead of on every wait while its bytes cannot move yet. EPOLLOUT is asked for only
  // while bytes wait for room (Pumped): a socket pair's end (the L7 paths) reports an EPOLLOUT
  // edge each time its peer reads, which would wake this thread for nothing.
  void Register(Conn& c, int fd) { Events(c, fd, EPOLL_CTL_ADD, false); }

  // After both directions were pumped: EPOLLOUT on a socket while its direction holds bytes.
  void Pumped(Conn& c) {
    WantOut(c, c.a, c.outA, c.ba.inPipe > 0);
    WantOut(c, c.b, c.outB, c.ab.inPipe > 0);
  }

  void WantOut(Conn& c, int fd, bool& now, bool want) {
    if (now == want) return;
    now = want;
    Events(c, fd, EPOLL_CTL_MOD, want);
  }

  void Events(Conn& c, int fd, int op, bool out) {
    epoll_event ev = {};
    ev.events = EPOLLIN | EPOLLRDHUP | EPOLLET | (out ? EPOLLOUT : 0u);
    ev.data.u64 = (c.id << 1) | (fd == c.b ? 1 : 0);
    epoll_ctl(epfd_, op, fd, &ev);
  }

  static void Failed(Conn& c, int err, const char* op) {
    c.error = std::string(op) + ": " + strerror(err);
    c.reason = err == ECONNRESET ? "reset" : "error";
    c.reset = true;
  }

  // Moves what it can in one direction. False on an error (recorded in c.error).
  static bool Pump(Conn& c, Direction& d) {
    for (;;) {
      if (d.inPipe > 0) {
        ssize_t n = splice(d.pipeR, nullptr, d.to, nullptr, d.inPipe, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n < 0) {
          if (errno == EAGAIN) return true;
          Failed(c, errno, "write");
          return false;
        }
        d.inPipe -= static_cast<size_t>(n);
        d.bytes += static_cast<uint64_t>(n);
        if (d.inPipe > 0) return true;
      }
      if (d.eof) break;
      ssize_t n = splice(d.from, nullptr, d.pipeW, nullptr, kChunk, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
      if (n < 0) {
        if (errno == EAGAIN) return true;
        Failed(c, errno, "read");
        return false;
      }
      if (n == 0) {
        d.eof = true;
        break;
      }
      d.inPipe += static_cast<size_t>(n);
    }
    if (d.eof && d.inPipe == 0 && !d.shutDown) {
      shutdown(d.to, SHUT_WR);
      d.shutDown = true;
    }
    return true;
  }

  void Finish(std::map<uint64_t, std::unique_ptr<Conn>>::iterator it) {
    Conn& c = *it->second;
    epoll_ctl(epfd_, EPOLL_CTL_DEL, c.a, nullptr);
    epoll_ctl(epfd_, EPOLL_CTL_DEL, c.b, nullptr);
    auto* d = new Done{c.id, c.ab.bytes, c.ba.bytes, c.error, c.reason};
    Close(c);
    conns_.erase(it);
    tsfn_.NonBlockingCall(d, [this](Napi::Env env, Napi::Function, Done* done) {
      Settle(env, *done);
      delete done;
      if (--active_ == 0) tsfn_.Unref(env);
    });
  }

  void Settle(Napi::Env env, const Done& d) {
    auto it = pending_.find(d.id);
    if (it == pending_.end()) return;
    Napi::Object r = Napi::Object::New(env);
    r.Set("bytesFromClient", Napi::Number::New(env, static_cast<double>(d.aToB)));
    r.Set("bytesToClient", Napi::Number::New(env, static_cast<double>(d.bToA)));
    if (!d.error.empty()) r.Set("error", Napi::String::New(env, d.error));
    if (!d.reason.empty()) r.Set("reason", Napi::String::New(env, d.reason));
    it->second.Resolve(r);
    pending_.erase(it);
  }

  void FinishWait(std::map<uint64_t, std::unique_ptr<Wait>>::iterator it, int err) {
    epoll_ctl(epfd_, EPOLL_CTL_DEL, it->second->fd, nullptr);
    auto* d = new WaitDone{it->first, err};
    waits_.erase(it);
    tsfn_.NonBlockingCall(d, [this](Napi::Env env, Napi::Function, WaitDone* done) {
      auto p = waitPending_.find(done->id);
      if (p != waitPending_.end()) {
        p->second.Resolve(Napi::Number::New(env, done->err));
        waitPending_.erase(p);
      }
      delete done;
      if (--active_ == 0) tsfn_.Unref(env);
    });
  }

  // The soonest connect deadline bounds how long the loop may sleep (at most a second).
  int NextTimeoutMs() const {
    int ms = 1000;
    auto now = Clock::now();
    for (const auto& [id, w] : waits_) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(w->deadline - now).count();
      ms = std::min<int>(ms, left < 0 ? 0 : static_cast<int>(left) + 1);
    }
    return ms;
  }

  void Loop() {
    epoll_event events[256];
    for (;;) {
      int n = epoll_wait(epfd_, events, 256, NextTimeoutMs());
      {
        std::lock_guard<std::mutex> lock(mu_);
        while (!incomingWaits_.empty()) {
          auto w = std::move(incomingWaits_.front());
          incomingWaits_.pop_front();
          epoll_event ev = {};
          ev.events = EPOLLOUT | EPOLLERR | EPOLLHUP | EPOLLONESHOT;
          ev.data.u64 = w->id << 1;
          int fd = w->fd;
          uint64_t id = w->id;
          waits_.emplace(id, std::move(w));
          if (epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0) FinishWait(waits_.find(id), errno);
        }
        while (!incoming_.empty()) {
          auto c = std::move(incoming_.front());
          incoming_.pop_front();
          Conn& ref = *c;
          conns_.emplace(ref.id, std::move(c));
          Register(ref, ref.a);
          Register(ref, ref.b);
          // Bytes may have arrived before registration: pump once now.
          bool ok = Pump(ref, ref.ab) && Pump(ref, ref.ba);
          if (!ok || (ref.ab.shutDown && ref.ba.shutDown)) Finish(conns_.find(ref.id));
          else Pumped(ref);
        }
      }
      for (int i = 0; i < n; i++) {
        uint64_t tag = events[i].data.u64;
        if (tag == 0) {
          uint64_t v;
          while (read(wake_, &v, sizeof(v)) > 0) {
          }
          continue;
        }
        auto wit = waits_.find(tag >> 1);
        if (wit != waits_.end()) {
          int soerr = 0;
          socklen_t len = sizeof(soerr);
          if (getsockopt(wit->second->fd, SOL_SOCKET, SO_ERROR, &soerr, &len) != 0) soerr = errno;
          FinishWait(wit, soerr);
          continue;
        }
        auto it = conns_.find(tag >> 1);
        if (it == conns_.end()) continue;
        Conn& c = *it->second;
        c.last = Clock::now();
        // Errors and resets surface from splice itself (SO_ERROR), in Pump.
        bool ok = Pump(c, c.ab) && Pump(c, c.ba);
        if (!ok || (c.ab.shutDown && c.ba.shutDown)) Finish(it);
        else Pumped(c);
      }
      // Connects past their deadline.
      auto now = Clock::now();
      for (auto it = waits_.begin(); it != waits_.end();) {
        auto next = std::next(it);
        if (now >= it->second->deadline) FinishWait(it, ETIMEDOUT);
        it = next;
      }
      // Idle timeouts (checked at least once a second), and a stopping proxy.
      bool aborting = abort_.exchange(false);
      for (auto it = conns_.begin(); it != conns_.end();) {
        auto next = std::next(it);
        Conn& c = *it->second;
        if (aborting) {
          c.error = "proxy stopping";
          c.reason = "proxy_stopping";
          Finish(it);
        } else if (c.idleMs > 0 && now - c.last > std::chrono::milliseconds(c.idleMs)) {
          c.error = "idle for " + std::to_string(c.idleMs) + " ms";
          c.reason = "idle_timeout";
          Finish(it);
        }
        it = next;
      }
    }
  }

  int epfd_ = -1, wake_ = -1;
  std::thread thread_;
  std::mutex mu_;
  std::deque<std::unique_ptr<Conn>> incoming_;
  std::map<uint64_t, std::unique_ptr<Conn>> conns_;  // relay thread only
  std::deque<std::unique_ptr<Wait>> incomingWaits_;
  std::map<uint64_t, std::unique_ptr<Wait>> waits_;  // relay thread only
  std::map<uint64_t, Napi::Promise::Deferred> waitPending_;  // JS thread only
  std::map<uint64_t, Napi::Promise::Deferred> pending_;  // JS thread only
  std::atomic<uint64_t> nextId_{0};
  std::atomic<int> active_{0};
  std::atomic<bool> abort_{false};
  Napi::ThreadSafeFunction tsfn_;
};

// relayFds(clientFd, upstreamFd, idleTimeoutMs): Promise<{bytesFromClient, bytesToClient, error?}>
// Takes ownership of both fds (pass a dup of a socket node:net still holds).
Napi::Value RelayFds(const Napi::CallbackInfo& info) {
  int a = info[0].As<Napi::Number>().Int32Value();
  int b = info[1].As<Napi::Number>().Int32Value();
  int idle = info[2].As<Napi::Number>().Int32Value();
  return RelayEngine::Get(info.Env()).Add(info.Env(), a, b, idle);
}

// awaitConnected(fd, timeoutMs): Promise<number>: 0 once fd's non-blocking connect completed, else
// its errno (ETIMEDOUT after timeoutMs). The fd stays the caller's either way.
Napi::Value AwaitConnected(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  int timeoutMs = info[1].As<Napi::Number>().Int32Value();
  return RelayEngine::Get(info.Env()).WaitConnected(info.Env(), fd, timeoutMs);
}

Napi::Value RelayAbortAll(const Napi::CallbackInfo& info) {
  RelayEngine::Get(info.Env()).AbortAll();
  return info.Env().Undefined();
}

// dupFd(fd): a close-on-exec duplicate, so node:net can close its own copy.
Napi::Value DupFd(const Napi::CallbackInfo& info) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  int copy = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (copy < 0) throw ToJsError(info.Env(), {errno, "fcntl(F_DUPFD_CLOEXEC)", "fd " + std::to_string(fd), ""});
  return Napi::Number::New(info.Env(), copy);
}

// socketPair(): two connected AF_UNIX stream sockets, non-blocking and close-on-exec. The L7 path
// joins a tunnel stream of the HBONE engine to node:http through one: the engine relays one end,
// node:net reads and writes the other.
Napi::Value SocketPair(const Napi::CallbackInfo& info) {
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) throw ToJsError(info.Env(), {errno, "socketpair(AF_UNIX)", "", ""});
  Napi::Array pair = Napi::Array::New(info.Env(), 2);
  pair.Set(0u, Napi::Number::New(info.Env(), sv[0]));
  pair.Set(1u, Napi::Number::New(info.Env(), sv[1]));
  return pair;
}

}  // namespace

Napi::Object InitRelay(Napi::Env env, Napi::Object exports) {
  exports.Set("relayFds", Napi::Function::New(env, RelayFds, "relayFds"));
  exports.Set("awaitConnected", Napi::Function::New(env, AwaitConnected, "awaitConnected"));
  exports.Set("dupFd", Napi::Function::New(env, DupFd, "dupFd"));
  exports.Set("socketPair", Napi::Function::New(env, SocketPair, "socketPair"));
  exports.Set("relayAbortAll", Napi::Function::New(env, RelayAbortAll, "relayAbortAll"));
  return exports;
}

}  // namespace nodemesh
