// A client connection's routes as an HTTP engine follows them without asking JS (EngineRoutes in
// datapath/native.ts): the route entries of the Service port the client called, in Gateway API's
// precedence, reduced by JS (src/proxy/http/engine-routes.ts) to what the engine can tell of a
// request by itself (path Exact and PathPrefix, method, exact header values) and to what it may do
// with it by itself (a weighted split over backend Services, an endpoint of each by round robin or
// at random, each endpoint a pool of upstream sessions). A request that reaches a rule the engine
// cannot read, or matches one whose action it does not take (filters, retries, timeouts, faults,
// mirrors, consistent hashing, circuit breaking...), or matches none, is JS's to decide, as is one
// whose endpoint's pool has no session yet.
#pragma once

#include <stdint.h>

#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "common.h"

namespace nodemesh {

// How often a request has a header field (the engine matches only one it has at most once: JS
// joins repeats, which the engine leaves to it).
enum class FieldCount { kAbsent, kOnce, kMany };

struct RouteTarget {
  std::string key;                 // the backend Service's key: what JS's reports name
  std::vector<std::string> pools;  // per endpoint that may be picked, its pool
  bool random = false;             // TrafficPolicy loadBalancer RANDOM; else round robin
  uint32_t maxRequests = 0;        // an HTTP/1.1 upstream connection closes after this many answers (0: no limit)
  uint32_t cursor = 0;
  uint32_t* active = nullptr;      // the engine's count of its requests in flight (inFlight())
};

struct RouteRule {
  bool readable = true;  // false: the engine cannot tell whether a request matches; JS decides from here on
  bool exact = false;    // Exact, else PathPrefix (its value without a trailing "/", or "/")
  std::string path, method;
  std::vector<std::pair<std::string, std::string>> headers;  // lower-case names, exact values
  // (target, weight); empty: a request it matches is JS's to decide.
  std::vector<std::pair<uint32_t, uint32_t>> backends;
  std::vector<int64_t> current;  // smooth weighted round robin (nginx's), as JS's LoadBalancer.pickWeighted

  bool PathMatches(std::string_view p) const {
    if (exact) return p == path;
    return path == "/" || p == path || (p.size() > path.size() && p.compare(0, path.size(), path) == 0 && p[path.size()] == '/');
  }

  uint32_t PickBackend() {
    int64_t total = 0;
    size_t best = 0;
    for (size_t i = 0; i < backends.size(); i++) {
      total += backends[i].second;
      current[i] += backends[i].second;
      if (current[i] > current[best]) best = i;
    }
    current[best] -= total;
    return backends[best].first;
  }
};

struct Routes {
  double id = -1;
  std::vector<RouteRule> rules;
  std::vector<RouteTarget> targets;
  uint64_t untilMs = std::numeric_limits<uint64_t>::max();  // JS decides again from then (an ejection ends)
  Napi::ObjectReference record;  // JS's object: handed back with each request reported

  // The rule a request goes by, or nullptr when it is JS's to decide. `field(name)` tells how
  // often the request has a header field, and its value when once.
  template <typename F>
  RouteRule* Match(std::string_view method, std::string_view path, F&& field) {
    for (RouteRule& r : rules) {
      if (!r.readable) return nullptr;
      if (!r.PathMatches(path) || (!r.method.empty() && r.method != method)) continue;
      bool all = true;
      for (const auto& [name, value] : r.headers) {
        std::string_view v;
        FieldCount n = field(name, &v);
        if (n == FieldCount::kMany) return nullptr;
        if (n == FieldCount::kAbsent || v != value) {
          all = false;
          break;
        }
      }
      if (!all) continue;
      return r.backends.empty() ? nullptr : &r;
    }
    return nullptr;
  }

  // Where a request goes by the first rule it matches (`target`: its request target, a query
  // after "?"): the backend (an index into targets) and its endpoint (an index into its pools),
  // counted in flight; false when it is JS's to decide.
  template <typename F>
  bool Route(std::string_view method, std::string_view target, F&& field, uint32_t* backend, uint32_t* endpoint) {
    RouteRule* rule = Match(method, target.substr(0, target.find('?')), field);
    if (!rule) return false;
    *backend = rule->PickBackend();
    RouteTarget& t = targets[*backend];
    *endpoint = PickEndpoint(t);
    (*t.active)++;
    return true;
  }

  // A request Route() sent to backend `t` is no longer in flight as the engine's (it ended, or went to JS).
  void Done(uint32_t t) {
    uint32_t* active = targets[t].active;
    if (*active > 0) (*active)--;
  }

  // The endpoint of `t` a request goes to (an index into its pools).
  uint32_t PickEndpoint(RouteTarget& t) {
    uint32_t n = static_cast<uint32_t>(t.pools.size());
    if (!t.random) return t.cursor = (t.cursor + 1) % n;
    // xorshift64*: the choice needs no more than to be even.
    seed_ ^= seed_ >> 12, seed_ ^= seed_ << 25, seed_ ^= seed_ >> 27;
    return static_cast<uint32_t>(((seed_ * 0x2545F4914F6CDD1DULL) >> 32) % n);
  }

 private:
  uint64_t seed_ = 0x9E3779B97F4A7C15ULL;
};

// JS's EngineRoutes as the engine keeps it; `active` holds the engine's in-flight count per
// backend Service key, shared by every Routes of the engine. `nowMs` is the engine's clock.
inline std::shared_ptr<Routes> ReadRoutes(const Napi::Object& o, std::unordered_map<std::string, uint32_t>& active, uint64_t nowMs) {
  auto r = std::make_shared<Routes>();
  r->id = o.Get("id").As<Napi::Number>().DoubleValue();
  double ttl = o.Get("ttlMs").As<Napi::Number>().DoubleValue();
  if (ttl >= 0) r->untilMs = nowMs + static_cast<uint64_t>(ttl);
  Napi::Array targets = o.Get("targets").As<Napi::Array>();
  for (uint32_t i = 0; i < targets.Length(); i++) {
    Napi::Object t = targets.Get(i).As<Napi::Object>();
    RouteTarget rt;
    rt.key = t.Get("key").As<Napi::String>().Utf8Value();
    rt.random = t.Get("random").ToBoolean().Value();
    Napi::Value max = t.Get("maxRequests");
    if (max.IsNumber()) rt.maxRequests = max.As<Napi::Number>().Uint32Value();
    Napi::Array pools = t.Get("pools").As<Napi::Array>();
    for (uint32_t j = 0; j < pools.Length(); j++) rt.pools.push_back(pools.Get(j).As<Napi::String>().Utf8Value());
    rt.cursor = static_cast<uint32_t>(rt.pools.empty() ? 0 : rt.pools.size() - 1);
    rt.active = &active[rt.key];
    r->targets.push_back(std::move(rt));
  }
  Napi::Array rules = o.Get("rules").As<Napi::Array>();
  for (uint32_t i = 0; i < rules.Length(); i++) {
    Napi::Object ro = rules.Get(i).As<Napi::Object>();
    RouteRule rule;
    Napi::Value m = ro.Get("match");
    if (!m.IsObject()) {
      rule.readable = false;
    } else {
      Napi::Object mo = m.As<Napi::Object>();
      rule.exact = mo.Get("exact").ToBoolean().Value();
      rule.path = Latin1(mo.Get("path"));
      Napi::Value method = mo.Get("method");
      if (method.IsString()) rule.method = Latin1(method);
      Napi::Array headers = mo.Get("headers").As<Napi::Array>();
      for (uint32_t j = 0; j < headers.Length(); j++) {
        Napi::Array h = headers.Get(j).As<Napi::Array>();
        rule.headers.emplace_back(Latin1(h.Get(0u)), Latin1(h.Get(1u)));
      }
    }
    Napi::Value backends = ro.Get("backends");
    if (backends.IsArray()) {
      Napi::Array b = backends.As<Napi::Array>();
      for (uint32_t j = 0; j < b.Length(); j++) {
        Napi::Array pair = b.Get(j).As<Napi::Array>();
        uint32_t target = pair.Get(0u).As<Napi::Number>().Uint32Value(), weight = pair.Get(1u).As<Napi::Number>().Uint32Value();
        // A target out of range, or one with no endpoint to pick: those requests are JS's.
        if (target >= r->targets.size() || r->targets[target].pools.empty()) {
          rule.backends.clear();
          break;
        }
        rule.backends.emplace_back(target, weight);
      }
      rule.current.assign(rule.backends.size(), 0);
    }
    r->rules.push_back(std::move(rule));
  }
  r->record = Napi::Persistent(o);
  return r;
}

// An engine's routes as JS gave them (route()), read once per id until Clear() (undirect()),
// and the engine's routed requests in flight per backend Service key (inFlight()).
class RouteBook {
 public:
  // The routes JS's object `v` stands for (read now if its id is new); none for anything but an object.
  std::shared_ptr<Routes> Get(const Napi::Value& v, uint64_t nowMs) {
    if (!v.IsObject()) return nullptr;
    Napi::Object o = v.As<Napi::Object>();
    double id = o.Get("id").As<Napi::Number>().DoubleValue();
    auto it = byId_.find(id);
    if (it == byId_.end()) it = byId_.emplace(id, ReadRoutes(o, active_, nowMs)).first;
    return it->second;
  }

  uint32_t InFlight(const std::string& key) const {
    auto it = active_.find(key);
    return it == active_.end() ? 0 : it->second;
  }

  // Routes are read again from now on (the requests in flight keep theirs, and their counts).
  void Clear() { byId_.clear(); }

 private:
  std::unordered_map<double, std::shared_ptr<Routes>> byId_;
  std::unordered_map<std::string, uint32_t> active_;
};

// A report's last three arguments (delivered()): the routes' JS object and the backend's and
// endpoint's indices of a routed request; undefined each for one that was not routed.
inline void RoutedArgs(Napi::Env env, const std::shared_ptr<Routes>& routes, uint32_t target, uint32_t endpoint, napi_value out[3]) {
  if (!routes) {
    out[0] = out[1] = out[2] = env.Undefined();
    return;
  }
  out[0] = routes->record.Value();
  out[1] = Napi::Number::New(env, target);
  out[2] = Napi::Number::New(env, endpoint);
}

}  // namespace nodemesh
