// SPDX-License-Identifier: Apache-2.0
// Sockets inside another network namespace. setns() changes the namespace of the calling thread
// only: the pool thread enters the pod's netns just for socket() and returns at once
// (netns_sockets.cc); the socket keeps the namespace it was made in.
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include <bpf/bpf.h>

#include "common.h"
#include "nodemesh_abi.h"
#include "netns_sockets.h"

#ifndef SO_NETNS_COOKIE
#define SO_NETNS_COOKIE 71
#endif

namespace nodemesh {

namespace {

struct SockAddr {
  sockaddr_storage ss = {};
  socklen_t len = 0;
  int family = 0;
};

// "10.0.0.1", "fd00::1", or "fe80::1%3": an IPv6 address with the index of its interface (a
// link-local destination needs one; names are per netns, so only the number is taken).
SockAddr ParseAddr(const std::string& spec, uint16_t port) {
  SockAddr a;
  auto* v4 = reinterpret_cast<sockaddr_in*>(&a.ss);
  auto* v6 = reinterpret_cast<sockaddr_in6*>(&a.ss);
  std::string host = spec;
  uint32_t scope = 0;
  size_t pct = spec.find('%');
  if (pct != std::string::npos) {
    host = spec.substr(0, pct);
    std::string digits = spec.substr(pct + 1);
    if (digits.empty() || digits.size() > 10 || digits.find_first_not_of("0123456789") != std::string::npos) ThrowSys(EINVAL, "inet_pton", spec);
    scope = static_cast<uint32_t>(std::stoul(digits));
  }
  if (scope == 0 && inet_pton(AF_INET, host.c_str(), &v4->sin_addr) == 1) {
    v4->sin_family = AF_INET;
    v4->sin_port = htons(port);
    a.len = sizeof(*v4);
    a.family = AF_INET;
  } else if (inet_pton(AF_INET6, host.c_str(), &v6->sin6_addr) == 1) {
    v6->sin6_family = AF_INET6;
    v6->sin6_port = htons(port);
    v6->sin6_scope_id = scope;
    a.len = sizeof(*v6);
    a.family = AF_INET6;
  } else {
    ThrowSys(EINVAL, "inet_pton", host);
  }
  return a;
}

void SetIntOpt(int fd, int level, int name, int value, const char* what, const std::string& where) {
  if (setsockopt(fd, level, name, &value, sizeof(value)) != 0) {
    int err = errno;
    close(fd);
    ThrowSys(err, std::string("setsockopt(") + what + ")", where);
  }
}

// Closes fd and throws the errno of the call that just failed.
[[noreturn]] void CloseAndThrow(int fd, const char* syscall, const std::string& where) {
  int err = errno;
  close(fd);
  ThrowSys(err, syscall, where);
}

// IP_TRANSPARENT lets the proxy bind or accept addresses that are not local (source preserving).
void SetTransparent(int fd, int family, const std::string& where) {
  if (family == AF_INET6)
    SetIntOpt(fd, IPPROTO_IPV6, IPV6_TRANSPARENT, 1, "IPV6_TRANSPARENT", where);
  else
    SetIntOpt(fd, IPPROTO_IP, IP_TRANSPARENT, 1, "IP_TRANSPARENT", where);
}

std::string Where(const std::string& ns, const std::string& host, uint16_t port) {
  bool v6 = host.find(':') != std::string::npos;
  return (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port) + " in " + ns;
}

struct ListenOptions {
  std::string netns, host;
  uint16_t port = 0;
  int backlog = 511;
  bool transparent = false;
};

int ListenIn(const ListenOptions& o) {
  SockAddr a = ParseAddr(o.host, o.port);
  std::string where = Where(o.netns, o.host, o.port);
  int fd = NetnsSocket(o.netns, a.family);
  SetIntOpt(fd, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR", where);
  if (a.family == AF_INET6) SetIntOpt(fd, IPPROTO_IPV6, IPV6_V6ONLY, 1, "IPV6_V6ONLY", where);
  if (o.transparent) SetTransparent(fd, a.family, where);
  if (bind(fd, reinterpret_cast<sockaddr*>(&a.ss), a.len) != 0) CloseAndThrow(fd, "bind", where);
  if (listen(fd, o.backlog) != 0) CloseAndThrow(fd, "listen", where);
  return fd;
}

struct ConnectOptions {
  std::string netns, host, localHost;
  uint16_t port = 0;
  uint32_t mark = 0;
  bool transparent = false;
  int bypassMapFd = -1;
};

// The 4-tuple of our socket as the destination pod sees it (we are its "remote").
nm_bypass_key BypassKey(int fd, const SockAddr& dst) {
  nm_bypass_key key = {};
  sockaddr_storage local = {};
  socklen_t len = sizeof(local);
  getsockname(fd, reinterpret_cast<sockaddr*>(&local), &len);
  if (dst.family == AF_INET) {
    auto* l = reinterpret_cast<sockaddr_in*>(&local);
    auto* d = reinterpret_cast<const sockaddr_in*>(&dst.ss);
    key.family = NM_AF_INET;
    key.remote_port = ntohs(l->sin_port);
    key.local_port = ntohs(d->sin_port);
    key.remote_addr[0] = l->sin_addr.s_addr;
    key.local_addr[0] = d->sin_addr.s_addr;
  } else {
    auto* l = reinterpret_cast<sockaddr_in6*>(&local);
    auto* d = reinterpret_cast<const sockaddr_in6*>(&dst.ss);
    key.family = NM_AF_INET6;
    key.remote_port = ntohs(l->sin6_port);
    key.local_port = ntohs(d->sin6_port);
    memcpy(key.remote_addr, &l->sin6_addr, 16);
    memcpy(key.local_addr, &d->sin6_addr, 16);
  }
  return key;
}

struct Started {
  int fd = -1;
  // connect() is in progress: the caller waits for it on the relay thread (awaitConnected).
  bool pending = false;
  // Registered in the bypass map for the handshake: the caller deletes it once the handshake is over.
  bool bypass = false;
  nm_bypass_key key = {};
};

// Runs on a libuv pool thread, briefly: only socket() needs the pod's netns (NetnsSocket); bind
// and a non-blocking connect() return at once. Nobody waits for the handshake here: a destination
// that drops SYNs must not hold one of libuv's four pool threads for the whole connect timeout.
Started ConnectStart(const ConnectOptions& o) {
  Started out;
  SockAddr a = ParseAddr(o.host, o.port);
  std::string where = Where(o.netns, o.host, o.port);
  int fd = NetnsSocket(o.netns, a.family);
  if (o.mark) SetIntOpt(fd, SOL_SOCKET, SO_MARK, static_cast<int>(o.mark), "SO_MARK", where);
  if (!o.localHost.empty()) {
    if (o.transparent) SetTransparent(fd, a.family, where);
    SockAddr local = ParseAddr(o.localHost, 0);
    if (bind(fd, reinterpret_cast<sockaddr*>(&local.ss), local.len) != 0)
      CloseAndThrow(fd, "bind", o.localHost + " in " + o.netns);
  }
  // Registered for the handshake only: sk_lookup consults it for the SYN, retransmits included.
  if (o.bypassMapFd >= 0) {
    out.key = BypassKey(fd, a);
    uint8_t one = 1;
    if (bpf_map_update_elem(o.bypassMapFd, &out.key, &one, BPF_ANY) != 0) CloseAndThrow(fd, "bpf(BPF_MAP_UPDATE_ELEM)", "nm_inbound_bypass");
    out.bypass = true;
  }
  if (connect(fd, reinterpret_cast<sockaddr*>(&a.ss), a.len) != 0) {
    if (errno != EINPROGRESS) {
      int err = errno;
      if (out.bypass) bpf_map_delete_elem(o.bypassMapFd, &out.key);
      close(fd);
      ThrowSys(err, "connect", where);
    }
    // Most upstreams are on this node: their handshake takes microseconds. A short, bounded wait
    // here saves them the trip through the relay thread; a SYN-dropping destination costs this
    // pool thread 2 ms at most, never the connect timeout.
    pollfd p = {fd, POLLOUT, 0};
    int n;
    do {
      n = poll(&p, 1, 2);
    } while (n < 0 && errno == EINTR);
    if (n > 0) {
      int soerr = 0;
      socklen_t len = sizeof(soerr);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &len);
      if (soerr != 0) {
        if (out.bypass) bpf_map_delete_elem(o.bypassMapFd, &out.key);
        close(fd);
        ThrowSys(soerr, "connect", where);
      }
    } else {
      out.pending = true;
    }
  }
  out.fd = fd;
  return out;
}

// A connection made by a short-lived child process that first joins a pod's cgroup and netns,
// so it meets exactly the programs the pod's own sockets meet. Used to prove capture works.
// The child of a multithreaded process may only make async-signal-safe calls: it does.
int ProbeConnect(const std::string& cgroupPath, const std::string& netns, const std::string& host, uint16_t port,
                 int timeoutMs) {
  SockAddr a = ParseAddr(host, port);
  std::string procs = cgroupPath + "/cgroup.procs";
  int cg = open(procs.c_str(), O_WRONLY | O_CLOEXEC);
  if (cg < 0) ThrowSys(errno, "open", procs);
  int ns = open(netns.c_str(), O_RDONLY | O_CLOEXEC);
  if (ns < 0) {
    int err = errno;
    close(cg);
    ThrowSys(err, "open", netns);
  }
  timeval tv = {timeoutMs / 1000, (timeoutMs % 1000) * 1000};
  pid_t pid = fork();
  if (pid == 0) {
    if (write(cg, "0", 1) != 1) _exit(250);
    if (setns(ns, CLONE_NEWNET) != 0) _exit(251);
    int fd = socket(a.family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) _exit(252);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    if (connect(fd, reinterpret_cast<sockaddr*>(&a.ss), a.len) != 0) _exit(errno & 0xff);
    _exit(0);
  }
  int forkErr = errno;
  close(cg);
  close(ns);
  if (pid < 0) ThrowSys(forkErr, "fork", "capture probe");
  int status = 0;
  while (waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) ThrowSys(errno, "waitpid", "capture probe");
  }
  if (!WIFEXITED(status)) return EINTR;
  int code = WEXITSTATUS(status);
  if (code == 250) ThrowSys(EPERM, "write", procs);
  if (code == 251) ThrowSys(EPERM, "setns", netns);
  if (code == 252) ThrowSys(EMFILE, "socket", "capture probe");
  return code;  // 0: connected; otherwise the errno connect() failed with
}

std::string StringOpt(const Napi::Object& o, const char* key, const std::string& fallback = "") {
  return o.Has(key) && o.Get(key).IsString() ? o.Get(key).As<Napi::String>().Utf8Value() : fallback;
}

int64_t NumberOpt(const Napi::Object& o, const char* key, int64_t fallback) {
  return o.Has(key) && o.Get(key).IsNumber() ? o.Get(key).As<Napi::Number>().Int64Value() : fallback;
}

bool BoolOpt(const Napi::Object& o, const char* key) {
  return o.Has(key) && o.Get(key).IsBoolean() && o.Get(key).As<Napi::Boolean>().Value();
}

Napi::Value FdResult(Napi::Env env, int fd) { return Napi::Number::New(env, fd); }

// listenInNetns({netns, host, port, backlog?, transparent?}): Promise<number>
Napi::Value ListenInNetns(const Napi::CallbackInfo& info) {
  Napi::Object opts = info[0].As<Napi::Object>();
  ListenOptions o;
  o.netns = StringOpt(opts, "netns");
  o.host = StringOpt(opts, "host");
  o.port = static_cast<uint16_t>(NumberOpt(opts, "port", 0));
  o.backlog = static_cast<int>(NumberOpt(opts, "backlog", 511));
  o.transparent = BoolOpt(opts, "transparent");
  auto fd = std::make_shared<int>(-1);
  return PromiseTask::Run(
      info.Env(), [o, fd]() { *fd = ListenIn(o); }, [fd](Napi::Env env) { return FdResult(env, *fd); });
}

// connectStartInNetns({netns, host, port, mark?, localHost?, transparent?, bypassMapFd?}):
// Promise<{fd, pending, bypassKey?}>: the socket, connecting; wait with awaitConnected(fd).
Napi::Value ConnectInNetns(const Napi::CallbackInfo& info) {
  Napi::Object opts = info[0].As<Napi::Object>();
  ConnectOptions o;
  o.netns = StringOpt(opts, "netns");
  o.host = StringOpt(opts, "host");
  o.localHost = StringOpt(opts, "localHost");
  o.port = static_cast<uint16_t>(NumberOpt(opts, "port", 0));
  o.mark = static_cast<uint32_t>(NumberOpt(opts, "mark", 0));
  o.transparent = BoolOpt(opts, "transparent");
  o.bypassMapFd = static_cast<int>(NumberOpt(opts, "bypassMapFd", -1));
  auto started = std::make_shared<Started>();
  return PromiseTask::Run(
      info.Env(), [o, started]() { *started = ConnectStart(o); },
      [started](Napi::Env env) {
        Napi::Object r = Napi::Object::New(env);
        r.Set("fd", Napi::Number::New(env, started->fd));
        r.Set("pending", Napi::Boolean::New(env, started->pending));
        if (started->bypass)
          r.Set("bypassKey", Napi::Buffer<uint8_t>::Copy(env, reinterpret_cast<const uint8_t*>(&started->key), sizeof(started->key)));
        return r;
      });
}

// probeConnect({cgroup, netns, host, port, timeoutMs}): Promise<number> (0 or connect's errno)
Napi::Value ProbeConnectJs(const Napi::CallbackInfo& info) {
  Napi::Object opts = info[0].As<Napi::Object>();
  std::string cgroup = StringOpt(opts, "cgroup"), netns = StringOpt(opts, "netns"), host = StringOpt(opts, "host");
  uint16_t port = static_cast<uint16_t>(NumberOpt(opts, "port", 0));
  int timeoutMs = static_cast<int>(NumberOpt(opts, "timeoutMs", 2000));
  auto result = std::make_shared<int>(-1);
  return PromiseTask::Run(
      info.Env(), [=]() { *result = ProbeConnect(cgroup, netns, host, port, timeoutMs); },
      [result](Napi::Env env) { return Napi::Number::New(env, *result); });
}

// releaseNetns(path): closes the fd the addon keeps of a pod's netns (call when the pod leaves).
Napi::Value ReleaseNetnsJs(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), ReleaseNetns(info[0].As<Napi::String>()));
}

Napi::Value CookieOpt(const Napi::CallbackInfo& info, int opt, const char* name) {
  int fd = info[0].As<Napi::Number>().Int32Value();
  uint64_t cookie = 0;
  socklen_t len = sizeof(cookie);
  if (getsockopt(fd, SOL_SOCKET, opt, &cookie, &len) != 0)
    throw ToJsError(info.Env(), {errno, std::string("getsockopt(") + name + ")", "fd " + std::to_string(fd), ""});
  return Napi::BigInt::New(info.Env(), cookie);
}

Napi::Value SocketCookie(const Napi::CallbackInfo& info) { return CookieOpt(info, SO_COOKIE, "SO_COOKIE"); }
Napi::Value NetnsCookie(const Napi::CallbackInfo& info) {
  return CookieOpt(info, SO_NETNS_COOKIE, "SO_NETNS_COOKIE");
}

}  // namespace

Napi::Object InitSockets(Napi::Env env, Napi::Object exports) {
  exports.Set("listenInNetns", Napi::Function::New(env, ListenInNetns, "listenInNetns"));
  exports.Set("connectStartInNetns", Napi::Function::New(env, ConnectInNetns, "connectStartInNetns"));
  exports.Set("probeConnect", Napi::Function::New(env, ProbeConnectJs, "probeConnect"));
  exports.Set("releaseNetns", Napi::Function::New(env, ReleaseNetnsJs, "releaseNetns"));
  exports.Set("socketCookie", Napi::Function::New(env, SocketCookie, "socketCookie"));
  exports.Set("netnsCookie", Napi::Function::New(env, NetnsCookie, "netnsCookie"));
  return exports;
}

}  // namespace nodemesh
