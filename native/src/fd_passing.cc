// SPDX-License-Identifier: Apache-2.0
// Passing open descriptors between two agents of one node (the surge handover, ARCHITECTURE.md):
// SCM_RIGHTS over a SOCK_SEQPACKET Unix socket, one message per batch (its JSON and its fds),
// boundaries kept by the socket type. Node has no API for ancillary data.
//
// The receiver (the new agent) listens on a socket in its run folder (root only) and waits on a
// pool thread; the sender (the old agent) connects, sends and closes, with a send timeout, on the
// JS thread: a few small messages into a socket that is already listening.
#include <errno.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common.h"

namespace nodemesh {

namespace {

// At most this many fds per message (the kernel's SCM_MAX_FD is 253).
constexpr size_t kMaxFds = 250;
// At most this many bytes of JSON per message.
constexpr size_t kMaxData = 64 * 1024;

struct Message {
  std::string data;
  std::vector<int> fds;
};

struct Received {
  int peerPid = 0;
  std::vector<Message> messages;
};

sockaddr_un UnixAddr(const std::string& path) {
  sockaddr_un a = {};
  a.sun_family = AF_UNIX;
  if (path.size() >= sizeof(a.sun_path)) ThrowSys(ENAMETOOLONG, "bind", path);
  memcpy(a.sun_path, path.c_str(), path.size() + 1);
  return a;
}

int64_t NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000 + ts.tv_nsec / 1000000;
}

// Waits for `events` on fd until the deadline; throws ETIMEDOUT past it.
void WaitFor(int fd, short events, int64_t deadline, const char* what, const std::string& where) {
  for (;;) {
    int64_t left = deadline - NowMs();
    if (left <= 0) ThrowSys(ETIMEDOUT, what, where);
    pollfd p = {fd, events, 0};
    int n = poll(&p, 1, static_cast<int>(left));
    if (n > 0) return;
    if (n < 0 && errno != EINTR) ThrowSys(errno, "poll", where);
  }
}

void CloseAll(std::vector<Message>& messages) {
  for (auto& m : messages)
    for (int fd : m.fds) close(fd);
  messages.clear();
}

// Accepts one sender on the listening socket and reads its messages until it closes.
Received ReceiveAll(int listenFd, int timeoutMs, const std::string& where) {
  int64_t deadline = NowMs() + timeoutMs;
  WaitFor(listenFd, POLLIN, deadline, "accept", where);
  int conn = accept4(listenFd, nullptr, nullptr, SOCK_CLOEXEC);
  if (conn < 0) ThrowSys(errno, "accept", where);
  Received out;
  ucred cred = {};
  socklen_t clen = sizeof(cred);
  if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &cred, &clen) != 0) {
    int err = errno;
    close(conn);
    ThrowSys(err, "getsockopt(SO_PEERCRED)", where);
  }
  if (cred.uid != 0) {
    close(conn);
    ThrowSys(EPERM, "accept (the sender is not root)", where);
  }
  out.peerPid = cred.pid;
  std::vector<char> data(kMaxData);
  std::vector<char> control(CMSG_SPACE(sizeof(int) * kMaxFds));
  try {
    for (;;) {
      WaitFor(conn, POLLIN, deadline, "recvmsg", where);
      iovec iov = {data.data(), data.size()};
      msghdr msg = {};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      msg.msg_control = control.data();
      msg.msg_controllen = control.size();
      ssize_t n = recvmsg(conn, &msg, MSG_CMSG_CLOEXEC);
      if (n < 0) {
        if (errno == EINTR || errno == EAGAIN) continue;
        ThrowSys(errno, "recvmsg", where);
      }
      Message m;
      for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        size_t count = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
        const int* fds = reinterpret_cast<const int*>(CMSG_DATA(c));
        for (size_t i = 0; i < count; i++) m.fds.push_back(fds[i]);
      }
      if (n == 0 && m.fds.empty()) break;  // the sender is done
      out.messages.push_back(std::move(m));
      Message& kept = out.messages.back();
      if (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) ThrowSys(EMSGSIZE, "recvmsg (a message or its fds were cut)", where);
      kept.data.assign(data.data(), static_cast<size_t>(n));
    }
  } catch (...) {
    close(conn);
    CloseAll(out.messages);
    throw;
  }
  close(conn);
  return out;
}

void SendAll(const std::string& path, const std::vector<Message>& messages, int timeoutMs) {
  for (const auto& m : messages) {
    if (m.fds.size() > kMaxFds) ThrowSys(E2BIG, "sendmsg (too many fds in one message)", path);
    if (m.data.size() > kMaxData || m.data.empty()) ThrowSys(EMSGSIZE, "sendmsg", path);
  }
  sockaddr_un a = UnixAddr(path);
  int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (fd < 0) ThrowSys(errno, "socket", path);
  timeval tv = {timeoutMs / 1000, (timeoutMs % 1000) * 1000};
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    int err = errno;
    close(fd);
    ThrowSys(err, "connect", path);
  }
  std::vector<char> control(CMSG_SPACE(sizeof(int) * kMaxFds));
  for (const auto& m : messages) {
    iovec iov = {const_cast<char*>(m.data.data()), m.data.size()};
    msghdr msg = {};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (!m.fds.empty()) {
      std::memset(control.data(), 0, control.size());
      msg.msg_control = control.data();
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * m.fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * m.fds.size());
      memcpy(CMSG_DATA(c), m.fds.data(), sizeof(int) * m.fds.size());
    }
    ssize_t n;
    do {
      n = sendmsg(fd, &msg, MSG_NOSIGNAL);
    } while (n < 0 && errno == EINTR);
    if (n < 0) {
      int err = errno;
      close(fd);
      ThrowSys(err == EAGAIN ? ETIMEDOUT : err, "sendmsg", path);
    }
  }
  close(fd);
}

// fdsListen(path): number. A SOCK_SEQPACKET socket listening at path (made anew, mode 0600).
Napi::Value FdsListen(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>().Utf8Value();
  try {
    sockaddr_un a = UnixAddr(path);
    int fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
    if (fd < 0) ThrowSys(errno, "socket", path);
    unlink(path.c_str());
    // Made with no access for anyone, then opened to root (bind honours the umask).
    mode_t old = umask(0177);
    int rc = bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    int err = errno;
    umask(old);
    if (rc != 0 || listen(fd, 1) != 0) {
      if (rc == 0) err = errno;
      close(fd);
      ThrowSys(err, rc != 0 ? "bind" : "listen", path);
    }
    return Napi::Number::New(info.Env(), fd);
  } catch (const SysError& e) {
    throw ToJsError(info.Env(), e);
  }
}

// fdsReceive(listenFd, timeoutMs): Promise<{peerPid, messages: [{data: string, fds: number[]}]}>.
// One sender, read until it closes; every fd received is the caller's (close-on-exec).
Napi::Value FdsReceive(const Napi::CallbackInfo& info) {
  int listenFd = info[0].As<Napi::Number>().Int32Value();
  int timeoutMs = info[1].As<Napi::Number>().Int32Value();
  auto received = std::make_shared<Received>();
  std::string where = "handover socket (fd " + std::to_string(listenFd) + ")";
  return PromiseTask::Run(
      info.Env(), [=]() { *received = ReceiveAll(listenFd, timeoutMs, where); },
      [received](Napi::Env env) {
        Napi::Object r = Napi::Object::New(env);
        r.Set("peerPid", Napi::Number::New(env, received->peerPid));
        Napi::Array messages = Napi::Array::New(env, received->messages.size());
        for (size_t i = 0; i < received->messages.size(); i++) {
          const Message& m = received->messages[i];
          Napi::Object o = Napi::Object::New(env);
          o.Set("data", Napi::String::New(env, m.data));
          Napi::Array fds = Napi::Array::New(env, m.fds.size());
          for (size_t j = 0; j < m.fds.size(); j++) fds.Set(static_cast<uint32_t>(j), Napi::Number::New(env, m.fds[j]));
          o.Set("fds", fds);
          messages.Set(static_cast<uint32_t>(i), o);
        }
        r.Set("messages", messages);
        return r;
      });
}

// fdsSend(path, messages: [{data: string, fds: number[]}], timeoutMs): void. The fds stay the
// caller's (the receiver gets its own copies).
Napi::Value FdsSend(const Napi::CallbackInfo& info) {
  std::string path = info[0].As<Napi::String>().Utf8Value();
  Napi::Array arr = info[1].As<Napi::Array>();
  int timeoutMs = info[2].As<Napi::Number>().Int32Value();
  std::vector<Message> messages;
  for (uint32_t i = 0; i < arr.Length(); i++) {
    Napi::Object o = arr.Get(i).As<Napi::Object>();
    Message m;
    m.data = o.Get("data").As<Napi::String>().Utf8Value();
    Napi::Array fds = o.Get("fds").As<Napi::Array>();
    for (uint32_t j = 0; j < fds.Length(); j++) m.fds.push_back(fds.Get(j).As<Napi::Number>().Int32Value());
    messages.push_back(std::move(m));
  }
  try {
    SendAll(path, messages, timeoutMs);
  } catch (const SysError& e) {
    throw ToJsError(info.Env(), e);
  }
  return info.Env().Undefined();
}

}  // namespace

Napi::Object InitFdPassing(Napi::Env env, Napi::Object exports) {
  exports.Set("fdsListen", Napi::Function::New(env, FdsListen, "fdsListen"));
  exports.Set("fdsReceive", Napi::Function::New(env, FdsReceive, "fdsReceive"));
  exports.Set("fdsSend", Napi::Function::New(env, FdsSend, "fdsSend"));
  return exports;
}

}  // namespace nodemesh
