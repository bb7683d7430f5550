// What the HTTP engines decide of a request without JS: its id when it has none, whether its
// target needs normalizing, and a connection's request gate (EngineGate in datapath/native.ts: the
// AuthorizationPolicies that apply, reduced by JS to method, host and path).
#pragma once

#include <errno.h>
#include <stdlib.h>
#include <sys/random.h>

#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "common.h"

namespace nodemesh {

// A random (version 4) UUID, as JS's newRequestId() writes it: 36 characters at `out`.
inline void NewRequestId(char* out) {
  static uint8_t pool[4096];
  static size_t at = sizeof(pool);
  if (at == sizeof(pool)) {
    size_t got = 0;
    while (got < sizeof(pool)) {
      ssize_t n = getrandom(pool + got, sizeof(pool) - got, 0);
      if (n > 0) got += static_cast<size_t>(n);
      else if (errno != EINTR) abort();  // the kernel's generator is always there (since 3.17)
    }
    at = 0;
  }
  static const char kHex[] = "0123456789abcdef";
  size_t o = 0;
  for (int i = 0; i < 16; i++) {
    uint8_t b = pool[at + i];
    if (i == 6) b = (b & 0x0f) | 0x40;
    else if (i == 8) b = (b & 0x3f) | 0x80;
    if (i == 4 || i == 6 || i == 8 || i == 10) out[o++] = '-';
    out[o++] = kHex[b >> 4];
    out[o++] = kHex[b & 0x0f];
  }
  at += 16;
}

// Istio's string match: exact, "prefix*", "*suffix", "*" (any value but none).
inline bool IstioMatch(std::string_view p, std::string_view v) {
  if (p == "*") return !v.empty();
  if (!p.empty() && p.back() == '*') return v.size() >= p.size() - 1 && v.compare(0, p.size() - 1, p.substr(0, p.size() - 1)) == 0;
  if (!p.empty() && p.front() == '*') return v.size() >= p.size() - 1 && v.compare(v.size() - (p.size() - 1), std::string_view::npos, p.substr(1)) == 0;
  return p == v;
}

// An AuthorizationPolicy operation reduced to what a request says (EngineGate in datapath/native.ts):
// each list empty, or one of its patterns matching; none of a not-list's matching.
struct GateOp {
  std::vector<std::string> hosts, notHosts, methods, notMethods, paths, notPaths;  // hosts lower-cased

  bool Matches(std::string_view method, std::string_view host, std::string_view path) const {
    auto any = [](const std::vector<std::string>& list, auto&& test) { return std::any_of(list.begin(), list.end(), test); };
    auto hostIs = [host](const std::string& p) {
      if (IstioMatch(p, host)) return true;
      // A pattern without a port matches the host on any port.
      std::string_view bare = host;
      if (!host.empty() && host[0] == '[') {
        size_t close = host.find(']');
        bare = host.substr(0, close == std::string_view::npos ? 0 : close + 1);
      } else if (size_t colon = host.rfind(':'); colon != std::string_view::npos && std::all_of(host.begin() + colon + 1, host.end(), [](char ch) { return ch >= '0' && ch <= '9'; })) {
        bare = host.substr(0, colon);
      }
      return bare != host && IstioMatch(p, bare);
    };
    auto methodIs = [method](const std::string& m) { return m == method; };
    auto pathIs = [path](const std::string& p) { return IstioMatch(p, path); };
    return (hosts.empty() || any(hosts, hostIs)) && !any(notHosts, hostIs) && (methods.empty() || any(methods, methodIs)) && !any(notMethods, methodIs) &&
           (paths.empty() || any(paths, pathIs)) && !any(notPaths, pathIs);
  }
};

// Which streams of a connection go on without asking JS: no deny operation matches, and with
// allow lists one allow operation does.
struct Gate {
  double id = -1;
  std::vector<GateOp> deny, allow;
  bool allowAll = true;
  bool readsHost = false;

  // Whether a request with this method, Host (or :authority) and path (without its query) goes
  // on unread. JS lower-cases hosts with Unicode's rules: a host with other than ASCII is JS's.
  bool PassesRequest(std::string_view method, std::string_view host, std::string_view path) const {
    if (!readsHost) return Passes(method, host, path);
    std::string lower(host);
    for (char& ch : lower) {
      if (static_cast<unsigned char>(ch) >= 0x80) return false;
      if (ch >= 'A' && ch <= 'Z') ch = static_cast<char>(ch + 32);
    }
    return Passes(method, lower, path);
  }

  bool Passes(std::string_view method, std::string_view host, std::string_view path) const {
    for (const GateOp& o : deny)
      if (o.Matches(method, host, path)) return false;
    if (allowAll) return true;
    for (const GateOp& o : allow)
      if (o.Matches(method, host, path)) return true;
    return false;
  }
};

// Whether a request target is one the destination's admission would pass on unchanged
// (HttpInbound.admit: normalizePath, then path and query joined again): an origin-form path with
// no percent-encoding and no "." or ".." segment, and no empty query. Any other goes to JS.
inline bool PlainTarget(std::string_view t) {
  if (t.empty() || t[0] != '/') return false;
  size_t q = t.find('?');
  if (q != std::string_view::npos && q + 1 == t.size()) return false;
  std::string_view path = t.substr(0, q);
  if (path.find('%') != std::string_view::npos) return false;
  size_t at = 1;
  while (at <= path.size()) {
    size_t end = path.find('/', at);
    if (end == std::string_view::npos) end = path.size();
    std::string_view seg = path.substr(at, end - at);
    if (seg == "." || seg == "..") return false;
    at = end + 1;
  }
  return true;
}

// forward()'s gate into `g`, unless `g` holds it already (the same id).
inline void ReadGate(const Napi::Object& o, Gate& g) {
  double id = o.Get("id").As<Napi::Number>().DoubleValue();
  if (id == g.id) return;
  auto strings = [](const Napi::Object& op, const char* key, bool lower) {
    std::vector<std::string> out;
    Napi::Value v = op.Get(key);
    if (!v.IsArray()) return out;
    Napi::Array a = v.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      std::string s = Latin1(a.Get(i));
      if (lower) std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return ch >= 'A' && ch <= 'Z' ? ch + 32 : ch; });
      out.push_back(std::move(s));
    }
    return out;
  };
  auto ops = [&strings, &g](const Napi::Value& v) {
    std::vector<GateOp> out;
    if (!v.IsArray()) return out;
    Napi::Array a = v.As<Napi::Array>();
    for (uint32_t i = 0; i < a.Length(); i++) {
      Napi::Object op = a.Get(i).As<Napi::Object>();
      GateOp r{strings(op, "hosts", true), strings(op, "notHosts", true), strings(op, "methods", false), strings(op, "notMethods", false), strings(op, "paths", false), strings(op, "notPaths", false)};
      if (!r.hosts.empty() || !r.notHosts.empty()) g.readsHost = true;
      out.push_back(std::move(r));
    }
    return out;
  };
  g = Gate();
  g.id = id;
  g.deny = ops(o.Get("deny"));
  Napi::Value allow = o.Get("allow");
  g.allowAll = !allow.IsArray();
  g.allow = ops(allow);
}

}  // namespace nodemesh
