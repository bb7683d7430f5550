// SPDX-License-Identifier: Apache-2.0
// HTTP/2 (h2c) proxying for the node proxy's L7 path (issue 14), on the JS thread's own event loop
// as the HTTP/1.1 engine (http1.cc) is: a client connection's session is served by nghttp2 here,
// each stream's headers are handed to JS once, which answers with where it goes (an upstream
// session of a pool and the request's header fields) or with the proxy's own answer; bodies,
// trailers, flow control and the upstream sessions stay here. JS is told how each stream ended
// (status, bytes, gRPC status) for metrics and logs.
//
// Flow control is the backpressure: DATA is acknowledged (nghttp2_session_consume) only once the
// other side's session took it into a frame, so a stream holds at most its window (kStreamWindow)
// here, a connection at most kConnectionWindow. nghttp2 checks what a client sends (frames,
// header blocks, floods) and ends its session with GOAWAY; none of such a stream goes upstream.
// A gRPC request message over the limit is refused (RESOURCE_EXHAUSTED) before its first byte
// leaves the proxy.
#include <errno.h>
#include <nghttp2/nghttp2.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "channel.h"
#include "common.h"
#include "gate.h"
#include "routes.h"

namespace nodemesh {

namespace {

constexpr size_t kReadChunk = 64 * 1024;
// Bytes of frames queued for a socket above which the session is not asked for more.
constexpr size_t kHighWater = 256 * 1024;
constexpr int32_t kStreamWindow = 1 << 20;
constexpr int32_t kConnectionWindow = 16 << 20;
constexpr uint32_t kServerMaxStreams = 256;
constexpr size_t kReplayLimit = 64 * 1024;  // a request body kept for a retry or a mirror (as the other paths keep it)
constexpr size_t kFieldBlockBytes = 512;     // a request's or an answer's fields, as most are

// Header fields as one buffer, each name and each value followed by a NUL (which no field name
// or value holds: RFC 9113 section 8.2.1): one allocation for a block, not two strings per field,
// and nghttp2 reads the fields in place (Nvs). JS hands blocks over joined the same way.
class FieldBlock {
 public:
  FieldBlock() = default;
  // From JS: names and values joined by NUL ("name\0value\0name\0value"), one crossing for them all.
  explicit FieldBlock(const Napi::Value& v) {
    if (!v.IsString()) return;
    buf_ = Latin1(v);
    if (!buf_.empty()) buf_.push_back('\0');
  }

  FieldBlock(std::initializer_list<std::pair<std::string_view, std::string_view>> fields) {
    for (const auto& [n, v] : fields) Add(n, v);
  }

  void Add(std::string_view n, std::string_view v) {
    buf_.append(n);
    buf_.push_back('\0');
    buf_.append(v);
    buf_.push_back('\0');
  }
  bool empty() const { return buf_.empty(); }
  void clear() { buf_.clear(); }
  // Room for a block's usual size at once (grown a field at a time, a block was copied about five times).
  void Reserve(size_t n) { buf_.reserve(n); }
  size_t capacity() const { return buf_.capacity(); }
  const std::string& bytes() const { return buf_; }

  // Each field in order, as f(name, value); a name with no value after it ends the block.
  template <typename F>
  void Each(F&& f) const {
    std::string_view all(buf_);
    size_t at = 0;
    while (at < all.size()) {
      size_t a = all.find('\0', at);
      if (a == std::string_view::npos) return;
      size_t b = all.find('\0', a + 1);
      if (b == std::string_view::npos) return;
      f(all.substr(at, a - at), all.substr(a + 1, b - a - 1));
      at = b + 1;
    }
  }

 private:
  std::string buf_;
};

// An answer's :status ("200"): 0 when it is not three digits (nghttp2 checked it already).
int StatusOf(std::string_view v) {
  if (v.size() != 3) return 0;
  int code = 0;
  for (char ch : v) {
    if (ch < '0' || ch > '9') return 0;
    code = code * 10 + (ch - '0');
  }
  return code;
}

nghttp2_nv Nv(std::string_view n, std::string_view v) {
  return {reinterpret_cast<uint8_t*>(const_cast<char*>(n.data())), reinterpret_cast<uint8_t*>(const_cast<char*>(v.data())), n.size(), v.size(), NGHTTP2_NV_FLAG_NONE};
}

// Header fields as nghttp2 takes them, appended to `out` (pointing into `f`, which must outlive the call).
void AddNvs(std::vector<nghttp2_nv>& out, const FieldBlock& f) {
  f.Each([&out](std::string_view n, std::string_view v) { out.push_back(Nv(n, v)); });
}

// A request's fields for nghttp2, those whose value is new in each request (its id, its trace
// and span ids) sent as literals that are never indexed: each would take a new entry of the
// HPACK dynamic table (4 KiB) and push out the entries that do repeat (user-agent, content-type,
// :authority), so the fields that repeat would go as literals again, on both sides of the hop.
void AddRequestNvs(std::vector<nghttp2_nv>& out, const FieldBlock& f, bool dropHost) {
  f.Each([&out, dropHost](std::string_view n, std::string_view v) {
    if (dropHost && n == "host") return;  // :authority says it
    nghttp2_nv nv = Nv(n, v);
    if (n == "x-request-id" || n == "traceparent" || n == "b3" || n == "x-b3-traceid" || n == "x-b3-spanid" || n == "x-b3-parentspanid") nv.flags = NGHTTP2_NV_FLAG_NO_INDEX;
    out.push_back(nv);
  });
}

std::vector<nghttp2_nv> Nvs(const FieldBlock& f) {
  std::vector<nghttp2_nv> out;
  AddNvs(out, f);
  return out;
}

// Bytes received from one stream for the other, taken from the front by a data provider.
struct Pipe {
  std::string buf;
  size_t off = 0;
  bool end = false;       // END_STREAM came
  bool trailers = false;  // it ended with a trailer block
  FieldBlock trailerFields;
  bool deferred = false;  // the reading provider is waiting (NGHTTP2_ERR_DEFERRED)

  size_t size() const { return buf.size() - off; }
  void Take(uint8_t* to, size_t n) {
    memcpy(to, buf.data() + off, n);
    off += n;
    if (off == buf.size()) buf.clear(), off = 0;
    else if (off > 256 * 1024 && off * 2 > buf.size()) buf.erase(0, off), off = 0;
  }
};

class H2Engine;
struct Exchange;

// A connection's exchanges (a client connection's streams, or those an upstream session
// carries): a list through the exchanges themselves (Exchange::links), so that a stream joins and
// leaves it with no allocation.
class ExchangeList {
 public:
  bool empty() const { return head_ == nullptr; }
  void Add(Exchange* x);
  void Remove(Exchange* x);
  // Each exchange, in no particular order (a copy: the caller may remove them as it goes).
  std::vector<Exchange*> All() const;
  // Empties the list (its exchanges left it already, or are going).
  void Clear();
  // An upstream session's list uses an exchange's second place (a client connection's its first).
  void SetUpstream(bool upstream) { upstream_ = upstream; }

 private:
  Exchange* head_ = nullptr;
  bool upstream_ = false;
};

// One socket with its session: a client's (server role) or an upstream's (client role). An
// upstream may be a channel to an HBONE stream instead (side 0 here; channel.h).
struct Conn final : ChannelEnd {
  H2Engine* engine = nullptr;
  uv_poll_t* poll = nullptr;
  int fd = -1;
  std::shared_ptr<Channel> ch;
  void ChannelChanged() override;
  int events = 0;
  bool server = false;
  uint64_t id = 0;  // JS's id for a client connection
  nghttp2_session* session = nullptr;
  std::string out;
  size_t outOff = 0;
  bool closed = false;
  bool dirty = false;
  bool refused = false;  // counted as a protocol error once
  // Upstream sessions: their pool, whether new streams may start on them, how many did.
  std::string pool;
  // A client connection's streams that go on without asking JS (forward()'s `gate`): their pool,
  // empty when each stream is JS's to decide, and which of them may.
  std::string direct;
  Gate gate;
  // A client connection's streams the engine routes itself (route()): by these routes, each to a
  // pool of the endpoint it picks; null when each stream is JS's to decide.
  std::shared_ptr<Routes> routes;
  bool retired = false;
  uint32_t started = 0;
  uint32_t maxRequests = 0;
  uint64_t lastActive = 0;
  uint64_t read = 0, written = 0;  // bytes the engine read from and wrote to the socket itself
  ExchangeList exchanges;
  // The last stream looked up and its exchange (StreamOf): a header block's fields, a frame's
  // callbacks and a body's data provider ask for the same stream one after another.
  int32_t seenSid = 0;
  Exchange* seenX = nullptr;
};

// The exchange of stream `sid` of the session whose user data is `user` (a Conn), or nullptr.
Exchange* StreamOf(void* user, nghttp2_session* session, int32_t sid) {
  Conn* c = static_cast<Conn*>(user);
  if (sid != 0 && sid == c->seenSid) return c->seenX;
  auto* x = static_cast<Exchange*>(nghttp2_session_get_stream_user_data(session, sid));
  if (x) c->seenSid = sid, c->seenX = x;
  return x;
}

// Sets the exchange of stream `sid` of `c`'s session (nullptr: the stream is given up).
void SetStream(Conn* c, int32_t sid, Exchange* x) {
  nghttp2_session_set_stream_user_data(c->session, sid, x);
  if (sid == c->seenSid) c->seenSid = 0, c->seenX = nullptr;
}

// One client stream, from its headers to its end, and the upstream stream it went out on.
struct Exchange {
  // Its places in its client connection's list and its upstream session's (ExchangeList).
  struct Link {
    Exchange* prev = nullptr;
    Exchange* next = nullptr;
    bool in = false;
  } links[2];
  uint64_t xid = 0;
  Conn* down = nullptr;
  int32_t downId = 0;
  Conn* up = nullptr;
  int32_t upId = 0;
  bool downClosed = false;
  bool upOpen = false;
  // The request as it came: its pseudo-header fields and the others.
  std::string method, path, authority;
  FieldBlock headers;
  bool hasRequestId = false, hasHost = false;
  size_t headerBytes = 0;
  bool headersDone = false;
  bool decided = false;   // forward() or respond() came
  bool dropping = false;  // the request's body is consumed and dropped (answered here, or its upstream went)
  bool grpc = false;
  uint8_t prefix[5] = {0};
  size_t prefixLen = 0;
  uint64_t messageLeft = 0;
  Pipe req, resp;
  bool answerHeaders = false;  // the upstream's answer headers came
  bool responded = false;      // headers went (or are queued) to the client
  bool respDone = false;       // the answer's END_STREAM went to the client
  int status = 0;
  std::string grpcStatus;
  std::string flag = "-";
  std::string detail;
  uint64_t bytesIn = 0, bytesOut = 0;
  std::vector<std::string> answerRemove;
  FieldBlock answerAdd;
  FieldBlock answerFields;  // the upstream's answer headers (pseudo-header left out)
  bool reported = false;
  // Forwarded by the engine on its connection's `direct` pool, JS never asked (then told of it in
  // delivered(), not done()); `noDirect`: JS decides it (it went back to JS once).
  bool direct = false, noDirect = false;
  // Routed by the engine (its connection's routes): the backend (a target of `routes`) and the
  // endpoint it went to, reported in delivered().
  std::shared_ptr<Routes> routes;
  uint32_t target = 0, endpoint = 0;
  std::string waitingPool;  // routed to a pool with no session yet: waiting for the one JS dials
  uint64_t startedNs = 0;
  // Retries and mirrors: the body kept as it comes (up to kReplayLimit), what was taken of it
  // for the attempt in flight and what of it was acknowledged to the client.
  bool attempted = false;
  bool keep = false;
  bool keptWhole = true;
  bool sawBody = false;
  std::string kept;
  bool retryable = false;
  std::vector<int> retryOn;
  uint64_t reqTaken = 0, reqAcked = 0;
};

void ExchangeList::Add(Exchange* x) {
  Exchange::Link& l = x->links[upstream_];
  if (l.in) return;
  l.in = true;
  l.prev = nullptr;
  l.next = head_;
  if (head_) head_->links[upstream_].prev = x;
  head_ = x;
}

void ExchangeList::Remove(Exchange* x) {
  Exchange::Link& l = x->links[upstream_];
  if (!l.in) return;
  if (l.prev) l.prev->links[upstream_].next = l.next;
  else head_ = l.next;
  if (l.next) l.next->links[upstream_].prev = l.prev;
  l = Exchange::Link();
}

std::vector<Exchange*> ExchangeList::All() const {
  std::vector<Exchange*> out;
  for (Exchange* x = head_; x; x = x->links[upstream_].next) out.push_back(x);
  return out;
}

void ExchangeList::Clear() {
  while (head_) Remove(head_);
}

ssize_t ReadRequestBody(nghttp2_session*, int32_t, uint8_t*, size_t, uint32_t*, nghttp2_data_source*, void*);
ssize_t ReadAnswerBody(nghttp2_session*, int32_t, uint8_t*, size_t, uint32_t*, nghttp2_data_source*, void*);

class H2Engine : public Napi::ObjectWrap<H2Engine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "H2Engine",
                       {
                           InstanceMethod<&H2Engine::Serve>("serve"),
                           InstanceMethod<&H2Engine::Forward>("forward"),
                           InstanceMethod<&H2Engine::Attach>("attach"),
                           InstanceMethod<&H2Engine::Respond>("respond"),
                           InstanceMethod<&H2Engine::Expire>("expire"),
                           InstanceMethod<&H2Engine::Abandon>("abandon"),
                           InstanceMethod<&H2Engine::KeptBody>("keptBody"),
                           InstanceMethod<&H2Engine::CloseJs>("close"),
                           InstanceMethod<&H2Engine::DropPools>("dropPools"),
                           InstanceMethod<&H2Engine::Undirect>("undirect"),
                           InstanceMethod<&H2Engine::Route>("route"),
                           InstanceMethod<&H2Engine::DialFailed>("dialFailed"),
                           InstanceMethod<&H2Engine::InFlight>("inFlight"),
                           InstanceMethod<&H2Engine::Stats>("stats"),
                           InstanceMethod<&H2Engine::Destroy>("destroy"),
                       });
  }

  // new H2Engine({request, done, closed, refused}, {idleMs, poolIdleMs, maxHeaderListBytes, grpcMaxMessage})
  explicit H2Engine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<H2Engine>(info), env_(info.Env()), ctx_(info.Env(), "nodemesh:h2") {
    Napi::Object cb = info[0].As<Napi::Object>();
    request_ = Napi::Persistent(cb.Get("request").As<Napi::Function>());
    retry_ = Napi::Persistent(cb.Get("retry").As<Napi::Function>());
    done_ = Napi::Persistent(cb.Get("done").As<Napi::Function>());
    delivered_ = Napi::Persistent(cb.Get("delivered").As<Napi::Function>());
    dial_ = Napi::Persistent(cb.Get("dial").As<Napi::Function>());
    closed_ = Napi::Persistent(cb.Get("closed").As<Napi::Function>());
    refused_ = Napi::Persistent(cb.Get("refused").As<Napi::Function>());
    Napi::Object o = info[1].As<Napi::Object>();
    idleMs_ = o.Get("idleMs").As<Napi::Number>().Int64Value();
    poolIdleMs_ = o.Get("poolIdleMs").As<Napi::Number>().Int64Value();
    maxHeaderList_ = o.Get("maxHeaderListBytes").As<Napi::Number>().Uint32Value();
    grpcMax_ = static_cast<uint64_t>(o.Get("grpcMaxMessage").As<Napi::Number>().Int64Value());

    nghttp2_session_callbacks_new(&callbacks_);
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks_, OnBeginHeaders);
    nghttp2_session_callbacks_set_on_header_callback(callbacks_, OnHeader);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks_, OnFrameRecv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks_, OnDataChunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks_, OnStreamClose);
    nghttp2_session_callbacks_set_on_frame_send_callback(callbacks_, OnFrameSend);
    nghttp2_session_callbacks_set_error_callback2(callbacks_, OnError);
    nghttp2_option_new(&options_);
    nghttp2_option_set_no_auto_window_update(options_, 1);
    // A closed stream is forgotten at once: nghttp2 otherwise keeps some in its priority tree
    // (RFC 7540 priorities, which nothing here uses), and every stream lookup pays for them.
    nghttp2_option_set_no_closed_streams(options_, 1);

    napi_get_uv_event_loop(env_, &loop_);
    timer_ = new uv_timer_t;
    uv_timer_init(loop_, timer_);
    timer_->data = this;
    uv_timer_start(timer_, [](uv_timer_t* t) { static_cast<H2Engine*>(t->data)->Sweep(); }, 1000, 1000);
    uv_unref(reinterpret_cast<uv_handle_t*>(timer_));
    reportIdle_ = new uv_idle_t;
    uv_idle_init(loop_, reportIdle_);
    reportIdle_->data = this;
  }

  ~H2Engine() override {
    Shutdown();
    if (callbacks_) nghttp2_session_callbacks_del(callbacks_);
    if (options_) nghttp2_option_del(options_);
  }

  // -- what the data providers call ------------------------------------------------------------

  // The request body to the upstream stream: what came from the client, acknowledged to the
  // client's session as it is taken; its end (and trailers) once all of it went.
  int64_t RequestBody(Exchange* x, uint8_t* buf, size_t length, uint32_t* flags) {
    size_t n = std::min(length, x->req.size());
    if (n > 0) {
      x->req.Take(buf, n);
      // A retry sends again what was acknowledged already: only what is new is.
      x->reqTaken += n;
      if (x->reqTaken > x->reqAcked) {
        Ack(x->down, x->downId, static_cast<size_t>(x->reqTaken - x->reqAcked));
        x->reqAcked = x->reqTaken;
      }
    }
    return Provided(&x->req, n, flags, x->up ? x->up->session : nullptr, x->upId);
  }

  int64_t AnswerBody(Exchange* x, uint8_t* buf, size_t length, uint32_t* flags) {
    size_t n = std::min(length, x->resp.size());
    if (n > 0) {
      x->resp.Take(buf, n);
      x->bytesOut += n;
      if (x->up && x->upOpen) Ack(x->up, x->upId, n);
    }
    return Provided(&x->resp, n, flags, x->down->session, x->downId);
  }

  // What a data provider returns once it took `n` bytes of `p`: the end when all of it went (its
  // trailers, if any, submitted on stream `sid` of `to`), NGHTTP2_ERR_DEFERRED when nothing is
  // there yet (resume_data wakes it), else `n`.
  static int64_t Provided(Pipe* p, size_t n, uint32_t* flags, nghttp2_session* to, int32_t sid) {
    if (p->size() == 0 && p->end) {
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      if (p->trailers && to) {
        *flags |= NGHTTP2_DATA_FLAG_NO_END_STREAM;
        auto nv = Nvs(p->trailerFields);
        nghttp2_submit_trailer(to, sid, nv.data(), nv.size());
      }
      return static_cast<int64_t>(n);
    }
    if (n == 0) {
      p->deferred = true;
      return NGHTTP2_ERR_DEFERRED;
    }
    return static_cast<int64_t>(n);
  }

 private:
  // -- JS methods --------------------------------------------------------------------------------

  // serve(id, fd, initial?): the engine owns the client connection (h2c, prior knowledge) from
  // now on under JS's id; `initial` is what was read from it already. Or serve(id, {channel}):
  // the client is an HBONE stream's, joined in memory (side 0 here).
  Napi::Value Serve(const Napi::CallbackInfo& info) {
    uint64_t id = static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value());
    if (clients_.count(id) != 0) throw Napi::Error::New(info.Env(), "h2 engine: id " + std::to_string(id) + " is in use");
    Conn* c = nullptr;
    if (std::shared_ptr<Channel> ch = ChannelArg(info[1], 0, "h2 engine")) {
      c = Open(-1, true, std::move(ch));
    } else {
      c = Open(info[1].As<Napi::Number>().Int32Value(), true);
      if (!c) throw ToJsError(info.Env(), {errno, "uv_poll_init", "", ""});
    }
    c->id = id;
    clients_[id] = c;
    Enter();
    if (info.Length() > 2 && info[2].IsBuffer()) {
      auto b = info[2].As<Napi::Buffer<uint8_t>>();
      Receive(c, b.Data(), b.Length());
    }
    Touch(c);
    Leave();
    return info.Env().Undefined();
  }

  // attach(pool, fd, maxRequests): a new upstream connection joins `pool` (its session starts).
  Napi::Value Attach(const Napi::CallbackInfo& info) {
    std::string pool = info[0].As<Napi::String>().Utf8Value();
    Conn* u = nullptr;
    if (std::shared_ptr<Channel> ch = ChannelArg(info[1], 0, "h2 engine")) {
      // An HBONE stream's, joined in memory.
      u = Open(-1, false, std::move(ch));
    } else {
      int fd = info[1].As<Napi::Number>().Int32Value();
      u = Open(fd, false);
      if (!u) {
        close(fd);
        throw ToJsError(info.Env(), {errno, "uv_poll_init", "", ""});
      }
    }
    u->pool = pool;
    u->maxRequests = info.Length() > 2 && info[2].IsNumber() ? info[2].As<Napi::Number>().Uint32Value() : 0;
    pools_[pool].push_back(u);
    Enter();
    Touch(u);
    ReleaseWaiting(pool);
    Leave();
    return info.Env().Undefined();
  }

  // dialFailed(pool): no session for `pool` came (the dial() event's): the routed streams that
  // wait for one are JS's to decide (request() events).
  Napi::Value DialFailed(const Napi::CallbackInfo& info) {
    std::string pool = info[0].As<Napi::String>().Utf8Value();
    Enter();
    auto it = waiting_.find(pool);
    if (it != waiting_.end()) {
      std::vector<uint64_t> xids = std::move(it->second);
      waiting_.erase(it);
      for (uint64_t xid : xids)
        if (Exchange* x = Waiting(xid, pool)) GiveBack(x);
    }
    Leave();
    return info.Env().Undefined();
  }

  // forward(xid, pool, fields, answerRemove, answerAdd, retryOn, keep, own): the stream goes
  // upstream as a new stream of a session of `pool` with these header fields (pseudo-header fields
  // first), then with `own` the stream's own. False when the pool has no session that takes new
  // streams (the caller dials, attach()es, and calls again).
  Napi::Value Forward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Exchange* x = Find(info[0]);
    if (!x || x->decided || x->downClosed || x->dropping) return Napi::Boolean::New(env, true);
    std::string pool = info[1].As<Napi::String>().Utf8Value();
    Conn* u = Usable(pool);
    if (!u) return Napi::Boolean::New(env, false);
    FieldBlock fields(info[2]);
    x->answerRemove.clear();
    if (info[3].IsArray()) {
      Napi::Array remove = info[3].As<Napi::Array>();
      for (uint32_t i = 0; i < remove.Length(); i++) x->answerRemove.push_back(remove.Get(i).As<Napi::String>().Utf8Value());
    }
    x->answerAdd = FieldBlock(info[4]);
    x->retryable = info.Length() > 5 && info[5].IsArray();
    x->retryOn.clear();
    if (x->retryable) {
      Napi::Array codes = info[5].As<Napi::Array>();
      for (uint32_t i = 0; i < codes.Length(); i++) x->retryOn.push_back(codes.Get(i).As<Napi::Number>().Int32Value());
    }
    if (!x->attempted) {
      // The body so far is all in the pipe (nothing was taken yet): kept from here on if asked.
      x->keep = x->retryable || (info.Length() > 6 && info[6].ToBoolean().Value());
      if (x->keep) {
        x->keptWhole = x->req.size() <= kReplayLimit;
        if (x->keptWhole) x->kept.assign(x->req.buf, x->req.off, std::string::npos);
      }
    }
    x->attempted = true;
    Enter();
    x->decided = true;
    // With `own`: the stream's own fields as they came (HTTP/2 has no hop-by-hop ones: nghttp2
    // refused the stream otherwise) after JS's, which are then the pseudo-header fields and additions.
    bool own = info.Length() > 7 && info[7].ToBoolean().Value();
    std::vector<nghttp2_nv> nv;
    AddRequestNvs(nv, fields, false);
    if (own) AddRequestNvs(nv, x->headers, true);
    int32_t sid = Submit(x, u, nv);
    if (sid < 0) {
      x->decided = false;
      Leave();
      throw Napi::Error::New(env, std::string("h2 engine: the upstream stream could not start: ") + nghttp2_strerror(sid));
    }
    // With a `gate` (what JS would pass on as it came on this connection), the connection's later
    // streams that it passes go the same way without asking JS, while their targets are plain and
    // the pool has a session that takes them (Dispatch); undirect() ends that.
    if (own && x->down && x->down->server) {
      if (info.Length() > 8 && info[8].IsObject()) {
        ReadGate(info[8].As<Napi::Object>(), x->down->gate);
        x->down->direct = pool;
      } else {
        x->down->direct.clear();
      }
    }
    Leave();
    return Napi::Boolean::New(env, true);
  }

  // The attempt goes out on `u` with these fields; its body (if any) as it comes. The stream's id
  // upstream, or nghttp2's error.
  int32_t Submit(Exchange* x, Conn* u, const std::vector<nghttp2_nv>& nv) {
    nghttp2_data_provider data;
    data.source.ptr = x;
    data.read_callback = ReadRequestBody;
    bool body = !(x->req.end && x->req.size() == 0 && !x->req.trailers);
    int32_t sid = nghttp2_submit_request(u->session, nullptr, nv.data(), nv.size(), body ? &data : nullptr, x);
    if (sid < 0) return sid;
    x->up = u;
    x->upId = sid;
    x->upOpen = true;
    u->exchanges.Add(x);
    u->started++;
    if (u->maxRequests > 0 && u->started >= u->maxRequests) Retire(u);
    Touch(u);
    return sid;
  }

  // A stream of a `direct` connection, forwarded here when JS would only have passed it on as it
  // came (the pseudo-header fields, then its own fields, its x-request-id among them): false
  // when it is JS's to decide (no direct pool, a gate that does not pass it, a target admission
  // would change, a host field, no session).
  bool ForwardDirect(Exchange* x) {
    Conn* c = x->down;
    if (c->direct.empty() || !MayGoAsItCame(x) || !PlainTarget(x->path)) return false;
    std::string_view path(x->path);
    if (!c->gate.PassesRequest(x->method, x->authority, path.substr(0, path.find('?')))) return false;
    Conn* u = Usable(c->direct);
    if (!u) return false;
    x->attempted = true;
    x->decided = true;
    if (!SubmitAsItCame(x, u)) {
      x->decided = false;
      return false;
    }
    x->direct = true;
    x->startedNs = uv_hrtime();
    return true;
  }

  // A stream of a client connection with routes (route()), routed here when JS would have sent it
  // on as it came (the pseudo-header fields, then its own fields, its x-request-id among them) to
  // the endpoint the routes pick: false when it is JS's to decide (no routes, or they ran out; a
  // rule the engine does not read or act on, or none matched; a host field; the endpoint's pool
  // has no session).
  bool ForwardRouted(Exchange* x) {
    Conn* c = x->down;
    Routes* routes = c->routes.get();
    if (!routes || !MayGoAsItCame(x) || x->path.empty() || x->path[0] != '/') return false;
    if (NowMs() >= routes->untilMs) {
      c->routes.reset();
      return false;
    }
    uint32_t t = 0, e = 0;
    auto field = [x](std::string_view name, std::string_view* value) {
      if (name == "host") {
        *value = x->authority;
        return FieldCount::kOnce;
      }
      FieldCount n = FieldCount::kAbsent;
      x->headers.Each([&](std::string_view fn, std::string_view fv) {
        if (fn != name) return;
        n = n == FieldCount::kAbsent ? FieldCount::kOnce : FieldCount::kMany;
        *value = fv;
      });
      return n;
    };
    if (!routes->Route(x->method, x->path, field, &t, &e)) return false;
    x->attempted = true;
    x->decided = true;
    x->direct = true;
    x->routes = c->routes;
    x->target = t;
    x->endpoint = e;
    x->startedNs = uv_hrtime();
    const std::string& pool = routes->targets[t].pools[e];
    if (Conn* u = Usable(pool)) {
      if (SubmitAsItCame(x, u)) return true;
      GiveBack(x, false);
      return false;
    }
    // No session yet: the stream waits for the one JS dials (a dial() event per pool), as the
    // engine picked it; if none comes, it is JS's (dialFailed()).
    auto& list = waiting_[pool];
    if (list.empty()) pendingDials_.push_back({c->id, x->routes, t, e});
    list.push_back(x->xid);
    x->waitingPool = pool;
    return true;
  }

  // Whether a stream may go on without JS as it came (SubmitAsItCame): it did not go back to JS
  // once, it is still open, and its :authority says its host (no host field to reconcile with it).
  static bool MayGoAsItCame(const Exchange* x) { return !x->noDirect && !x->downClosed && !x->dropping && !x->hasHost && !x->authority.empty(); }

  // A stream goes out on `u` as it came (the engine's own decision): the pseudo-header fields, then its own fields.
  bool SubmitAsItCame(Exchange* x, Conn* u) {
    std::vector<nghttp2_nv> nv;
    nv.reserve(16);
    nv.push_back(Nv(":method", x->method));
    nv.push_back(Nv(":scheme", "http"));
    nv.push_back(Nv(":authority", x->authority));
    nv.push_back(Nv(":path", x->path));
    AddRequestNvs(nv, x->headers, true);
    return Submit(x, u, nv) >= 0;
  }

  // A routed stream is JS's to decide after all (a request() event, when `ask`).
  void GiveBack(Exchange* x, bool ask = true) {
    Unroute(x);
    x->routes.reset();
    x->waitingPool.clear();
    x->direct = false;
    x->decided = false;
    x->noDirect = true;
    if (ask) pendingRequests_.push_back(x->xid);
  }

  // The stream `xid` if it still waits for a session of `pool`.
  Exchange* Waiting(uint64_t xid, const std::string& pool) {
    auto it = exchanges_.find(xid);
    if (it == exchanges_.end()) return nullptr;
    Exchange* x = it->second.get();
    if (x->waitingPool != pool) return nullptr;
    if (x->downClosed || x->dropping) {
      x->waitingPool.clear();
      return nullptr;
    }
    return x;
  }

  // A session of `pool` came: the routed streams that waited for it go out on it.
  void ReleaseWaiting(const std::string& pool) {
    auto it = waiting_.find(pool);
    if (it == waiting_.end()) return;
    std::vector<uint64_t> xids = std::move(it->second);
    waiting_.erase(it);
    for (uint64_t xid : xids) {
      Exchange* x = Waiting(xid, pool);
      if (!x) continue;
      x->waitingPool.clear();
      Conn* u = Usable(pool);
      if (!u || !SubmitAsItCame(x, u)) GiveBack(x);
    }
  }

  // A routed stream is no longer in flight as the engine's (it ended, or went to JS).
  static void Unroute(Exchange* x) {
    if (x->routes) x->routes->Done(x->target);
  }

  // respond(xid, status, fields, body): the proxy's own answer to a stream waiting for a decision
  // (its request body, if any, is read and dropped); done() follows when the stream ends.
  Napi::Value Respond(const Napi::CallbackInfo& info) {
    Exchange* x = Find(info[0]);
    if (!x || x->decided || x->downClosed || x->dropping) return info.Env().Undefined();
    Enter();
    x->decided = true;
    x->flag = "";
    Answer(x, info[1].As<Napi::Number>().Int32Value(), FieldBlock(info[2]), Latin1(info[3]));
    Leave();
    return info.Env().Undefined();
  }

  // expire(xid, status, fields, body): the stream's time ran out. Answered with these if nothing
  // of its answer went yet: 0; else the stream is reset (its upstream too) and the status of the
  // answer that was cut returned; -1 when the stream is not in flight. done() follows either way.
  Napi::Value Expire(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Exchange* x = Find(info[0]);
    if (!x || x->downClosed || x->respDone) return Napi::Number::New(env, -1);
    Enter();
    x->flag = "";
    CancelUpstream(x);
    int result = 0;
    if (x->responded) {
      result = x->status;
      nghttp2_submit_rst_stream(x->down->session, NGHTTP2_FLAG_NONE, x->downId, NGHTTP2_CANCEL);
      Touch(x->down);
    } else {
      x->decided = true;
      Answer(x, info[1].As<Napi::Number>().Int32Value(), FieldBlock(info[2]), Latin1(info[3]));
    }
    Leave();
    return Napi::Number::New(env, result);
  }

  // abandon(xid): the attempt in flight is given up before its answer came (a per-try timeout):
  // its upstream stream is cancelled and the stream waits for forward() again: 1. 0 when there
  // is none to give up (its answer is under way, or nothing is in flight); -1 when it cannot be
  // sent again (its body is not whole yet, or was not kept): nothing is done.
  Napi::Value Abandon(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Exchange* x = Find(info[0]);
    if (!x || x->downClosed || x->dropping || !x->up || x->answerHeaders || x->responded) return Napi::Number::New(env, 0);
    if (!Replayable(x)) return Napi::Number::New(env, -1);
    Enter();
    DropAttempt(x);
    Leave();
    return Napi::Number::New(env, 1);
  }

  // keptBody(xid): the stream's request body once it ended and was kept whole (empty without
  // one); undefined otherwise. Valid until its done() returns.
  Napi::Value KeptBody(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Exchange* x = Find(info[0]);
    if (!x || !Replayable(x)) return env.Undefined();
    return Napi::Buffer<char>::Copy(env, x->kept.data(), x->sawBody ? x->kept.size() : 0);
  }

  Napi::Value CloseJs(const Napi::CallbackInfo& info) {
    auto it = clients_.find(static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value()));
    if (it != clients_.end()) {
      Enter();
      CloseConn(it->second);
      Leave();
    }
    return info.Env().Undefined();
  }

  // undirect(): every stream from now on is JS's to decide again (the config changed).
  Napi::Value Undirect(const Napi::CallbackInfo& info) {
    for (auto& [id, c] : clients_) c->direct.clear(), c->gate = Gate(), c->routes.reset();
    routeBook_.Clear();
    return info.Env().Undefined();
  }

  // route(xid, routes): the later streams of the stream's client connection are routed here by
  // `routes` (EngineRoutes), each reported in delivered(); without `routes`, each is JS's to decide.
  // Routes are read once per id until undirect().
  Napi::Value Route(const Napi::CallbackInfo& info) {
    Exchange* x = Find(info[0]);
    if (x && x->down && !x->down->closed) x->down->routes = routeBook_.Get(info[1], NowMs());
    return info.Env().Undefined();
  }

  // inFlight(key): requests to the backend Service `key` the engine routed itself that are in flight.
  Napi::Value InFlight(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), routeBook_.InFlight(info[0].As<Napi::String>().Utf8Value()));
  }

  // dropPools(prefix): upstream sessions of pools whose key starts with it take no new stream
  // and end (GOAWAY) once their streams did.
  Napi::Value DropPools(const Napi::CallbackInfo& info) {
    std::string prefix = info[0].As<Napi::String>().Utf8Value();
    Enter();
    std::vector<Conn*> drop;
    for (auto& [key, list] : pools_)
      if (key.compare(0, prefix.size(), prefix) == 0) drop.insert(drop.end(), list.begin(), list.end());
    for (Conn* u : drop) Retire(u);
    Leave();
    return info.Env().Undefined();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    size_t sessions = 0;
    for (auto& [k, v] : pools_) sessions += v.size();
    Napi::Object o = Napi::Object::New(env);
    o.Set("clients", Napi::Number::New(env, static_cast<double>(clients_.size())));
    o.Set("upstreams", Napi::Number::New(env, static_cast<double>(sessions)));
    o.Set("streams", Napi::Number::New(env, static_cast<double>(exchanges_.size())));
    return o;
  }

  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  // -- streams -----------------------------------------------------------------------------------

  Exchange* Find(const Napi::Value& v) {
    auto it = exchanges_.find(static_cast<uint64_t>(v.As<Napi::Number>().Int64Value()));
    return it == exchanges_.end() ? nullptr : it->second.get();
  }

  // Acknowledges `n` bytes of a stream's DATA to its sender (they left the proxy, or were dropped).
  void Ack(Conn* c, int32_t sid, size_t n) {
    if (!c || c->closed || n == 0) return;
    nghttp2_session_consume(c->session, sid, n);
    Touch(c);
  }

  // The proxy's answer on the client's stream (or a reset if headers went already).
  void Answer(Exchange* x, int status, const FieldBlock& extra, const std::string& body) {
    x->dropping = true;
    if (x->req.size() > 0) {
      Ack(x->down, x->downId, x->req.size());
      x->req.buf.clear();
      x->req.off = 0;
    }
    if (x->responded) {
      nghttp2_submit_rst_stream(x->down->session, NGHTTP2_FLAG_NONE, x->downId, NGHTTP2_INTERNAL_ERROR);
      Touch(x->down);
      return;
    }
    std::string code = std::to_string(status), length = std::to_string(body.size());
    std::vector<nghttp2_nv> nv = {Nv(":status", code)};
    AddNvs(nv, extra);
    if (!body.empty()) nv.push_back(Nv("content-length", length));
    x->status = status;
    x->responded = true;
    x->resp = Pipe();
    x->resp.buf = body;
    x->resp.end = true;
    nghttp2_data_provider data;
    data.source.ptr = x;
    data.read_callback = ReadAnswerBody;
    nghttp2_submit_response(x->down->session, x->downId, nv.data(), nv.size(), body.empty() ? nullptr : &data);
    Touch(x->down);
  }

  // The upstream stream is given up (a timeout, the client left, a message over the limit).
  void CancelUpstream(Exchange* x) {
    if (!x->up || !x->upOpen) return;
    nghttp2_submit_rst_stream(x->up->session, NGHTTP2_FLAG_NONE, x->upId, NGHTTP2_CANCEL);
    Touch(x->up);
    UnlinkUp(x);
  }

  void UnlinkUp(Exchange* x) {
    if (!x->up) return;
    Conn* u = x->up;
    if (!u->closed) {
      if (x->upOpen) SetStream(u, x->upId, nullptr);
      // What of its answer is still buffered here is acknowledged now (the connection's window).
      if (x->resp.size() > 0) nghttp2_session_consume(u->session, x->upId, x->resp.size());
      Touch(u);
    }
    x->upOpen = false;
    u->exchanges.Remove(x);
    u->lastActive = NowMs();
    if (u->retired && u->exchanges.empty()) Finish(u);
    x->up = nullptr;
  }

  // A request body's gRPC messages are checked as they come: false when one is over the limit.
  bool GrpcFits(Exchange* x, const uint8_t* data, size_t len) {
    size_t i = 0;
    while (i < len) {
      if (x->messageLeft > 0) {
        size_t take = static_cast<size_t>(std::min<uint64_t>(x->messageLeft, len - i));
        x->messageLeft -= take;
        i += take;
        continue;
      }
      size_t take = std::min(5 - x->prefixLen, len - i);
      memcpy(x->prefix + x->prefixLen, data + i, take);
      x->prefixLen += take;
      i += take;
      if (x->prefixLen < 5) continue;
      x->prefixLen = 0;
      uint64_t length = (uint64_t{x->prefix[1]} << 24) | (uint64_t{x->prefix[2]} << 16) | (uint64_t{x->prefix[3]} << 8) | x->prefix[4];
      if (length > grpcMax_) {
        RefuseMessage(x, length);
        return false;
      }
      x->messageLeft = length;
    }
    return true;
  }

  // RESOURCE_EXHAUSTED as a trailers-only answer, or a reset once an answer began.
  void RefuseMessage(Exchange* x, uint64_t length) {
    CancelUpstream(x);
    x->flag = "DPE";
    x->grpcStatus = "8";
    x->status = 200;
    x->dropping = true;
    if (x->req.size() > 0) Ack(x->down, x->downId, x->req.size());
    x->req = Pipe();
    if (x->responded) {
      nghttp2_submit_rst_stream(x->down->session, NGHTTP2_FLAG_NONE, x->downId, NGHTTP2_CANCEL);
    } else {
      x->responded = true;
      x->respDone = true;
      std::string message = "a message of " + std::to_string(length) + " bytes is over the limit of " + std::to_string(grpcMax_);
      std::vector<nghttp2_nv> nv = {Nv(":status", "200"), Nv("content-type", "application/grpc"), Nv("grpc-status", "8"), Nv("grpc-message", message)};
      nghttp2_submit_response(x->down->session, x->downId, nv.data(), nv.size(), nullptr);
    }
    Touch(x->down);
  }

  // The upstream's answer headers: to the client with the route's changes.
  void PassAnswer(Exchange* x, bool endStream) {
    if (x->downClosed || x->responded) return;
    // Pointing into answerFields and answerAdd: both stay until the answer is submitted.
    std::string code = std::to_string(x->status);
    std::vector<nghttp2_nv> nv = {Nv(":status", code)};
    x->answerFields.Each([x, endStream, &nv](std::string_view n, std::string_view v) {
      if (std::find(x->answerRemove.begin(), x->answerRemove.end(), n) != x->answerRemove.end()) return;
      if (endStream && n == "grpc-status") x->grpcStatus = v;
      nv.push_back(Nv(n, v));
    });
    AddNvs(nv, x->answerAdd);
    x->responded = true;
    if (endStream) {
      x->respDone = true;
      nghttp2_submit_response(x->down->session, x->downId, nv.data(), nv.size(), nullptr);
    } else {
      nghttp2_data_provider data;
      data.source.ptr = x;
      data.read_callback = ReadAnswerBody;
      nghttp2_submit_response(x->down->session, x->downId, nv.data(), nv.size(), &data);
    }
    x->answerFields.clear();
    Touch(x->down);
  }

  void Resume(Conn* c, int32_t sid, Pipe* p) {
    if (!c || c->closed || !p->deferred) return;
    p->deferred = false;
    nghttp2_session_resume_data(c->session, sid);
    Touch(c);
  }

  // Whether the request can go again: it ended, and had no body or had it kept whole.
  static bool Replayable(const Exchange* x) { return x->req.end && (!x->sawBody || (x->keep && x->keptWhole)); }

  // The attempt in flight is dropped (its answer, if one began to come, with it) and the stream
  // waits for forward() again, its body (as kept) to be sent again.
  void DropAttempt(Exchange* x) {
    CancelUpstream(x);
    x->answerHeaders = false;
    x->status = 0;
    x->answerFields.clear();
    x->grpcStatus.clear();
    x->resp = Pipe();
    x->req.buf = x->kept;
    x->req.off = 0;
    x->req.deferred = false;
    x->reqTaken = 0;
    x->decided = false;
  }

  // JS decides whether the request goes again (`status`: the answer's code, 0 for a stream that
  // ended before any answer): true when it does (it calls forward() again, now or later).
  bool AskRetry(Exchange* x, int status) {
    if (!Replayable(x) || x->responded || x->downClosed || x->dropping) return false;
    if (x->direct) {
      // Only a stream that ended before any answer (refused, reset, its session lost) goes again:
      // to JS, which decides it as any other (it goes again once more if refused again).
      if (status != 0) return false;
      DropAttempt(x);
      GiveBack(x);
      return true;
    }
    Napi::HandleScope scope(env_);
    if (!CallBool(retry_, {Napi::Number::New(env_, static_cast<double>(x->xid)), Napi::Number::New(env_, status)})) return false;
    DropAttempt(x);
    return true;
  }

  // The upstream stream ended (closed, reset, or its session went) with `code`.
  void UpstreamEnded(Exchange* x, uint32_t code) {
    bool answered = x->answerHeaders;
    bool whole = x->resp.end;
    UnlinkUp(x);
    if (x->downClosed || x->dropping) return;
    // Before any answer: a route's retry may send it again; so may a refused stream (it was not
    // processed: RFC 9113 8.7), which JS sends again once without a retry rule.
    if (!answered && (x->retryable || code == NGHTTP2_REFUSED_STREAM) && AskRetry(x, 0)) return;
    if (!answered) {
      x->flag = code == NGHTTP2_REFUSED_STREAM ? "UF" : "UC";
      x->detail = "the upstream stream ended before an answer (code " + std::to_string(code) + ")";
      Answer(x, 503, {{"content-type", "text/plain"}}, x->detail + "\n");
      return;
    }
    if (!whole) {
      x->flag = "UPE";
      nghttp2_submit_rst_stream(x->down->session, NGHTTP2_FLAG_NONE, x->downId, code == NGHTTP2_NO_ERROR ? static_cast<uint32_t>(NGHTTP2_INTERNAL_ERROR) : code);
      Touch(x->down);
    }
  }

  // The client's stream ended: its upstream goes if it is still open; JS hears how it ended.
  void DownstreamEnded(Exchange* x, uint32_t code) {
    x->downClosed = true;
    if (x->down && !x->down->closed) {
      SetStream(x->down, x->downId, nullptr);
      if (x->req.size() > 0) nghttp2_session_consume(x->down->session, x->downId, x->req.size());
      x->req.buf.clear();
      x->req.off = 0;
    }
    if (x->down) x->down->exchanges.Remove(x);
    if (!x->respDone && x->flag == "-") x->flag = "DC";
    CancelUpstream(x);
    if (x->headersDone) pendingDone_.push_back(x->xid);
    else Bury(x);
  }

  // An exchange for a new stream: one that ended, with the room its buffers had, if there is one.
  std::unique_ptr<Exchange> NewExchange() {
    if (spare_.empty()) return std::make_unique<Exchange>();
    std::unique_ptr<Exchange> x = std::move(spare_.back());
    spare_.pop_back();
    return x;
  }

  // An exchange that ended, reset and kept for a later stream with its field blocks' and bodies'
  // room (up to kSpareExchanges of them, buffers of up to kSpareBytes): each stream made five
  // allocations for them, and under load the streams that end together freed a burst of them.
  void Recycle(std::unique_ptr<Exchange> x) {
    if (spare_.size() >= kSpareExchanges) return;
    FieldBlock headers = std::move(x->headers), answer = std::move(x->answerFields);
    std::string reqBuf = std::move(x->req.buf), respBuf = std::move(x->resp.buf);
    *x = Exchange();
    if (headers.capacity() <= kSpareBytes) headers.clear(), x->headers = std::move(headers);
    if (answer.capacity() <= kSpareBytes) answer.clear(), x->answerFields = std::move(answer);
    if (reqBuf.capacity() <= kSpareBytes) reqBuf.clear(), x->req.buf = std::move(reqBuf);
    if (respBuf.capacity() <= kSpareBytes) respBuf.clear(), x->resp.buf = std::move(respBuf);
    spare_.push_back(std::move(x));
  }

  void Bury(Exchange* x) {
    auto it = exchanges_.find(x->xid);
    if (it == exchanges_.end()) return;
    graveyard_.push_back(std::move(it->second));
    exchanges_.erase(it);
  }

  // -- nghttp2 callbacks ---------------------------------------------------------------------------

  static H2Engine* Of(void* user) { return static_cast<Conn*>(user)->engine; }

  static int OnBeginHeaders(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    Conn* c = static_cast<Conn*>(user);
    if (!c->server || frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
    H2Engine* e = c->engine;
    auto x = e->NewExchange();
    x->xid = ++e->nextXid_;
    x->down = c;
    x->downId = frame->hd.stream_id;
    x->headers.Reserve(kFieldBlockBytes);
    x->answerFields.Reserve(kFieldBlockBytes);
    c->exchanges.Add(x.get());
    SetStream(c, frame->hd.stream_id, x.get());
    e->exchanges_[x->xid] = std::move(x);
    return 0;
  }

  static int OnHeader(nghttp2_session* session, const nghttp2_frame* frame, const uint8_t* name, size_t namelen, const uint8_t* value, size_t valuelen, uint8_t, void* user) {
    Conn* c = static_cast<Conn*>(user);
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    auto* x = StreamOf(user, session, frame->hd.stream_id);
    if (!x) return 0;
    std::string_view n(reinterpret_cast<const char*>(name), namelen), v(reinterpret_cast<const char*>(value), valuelen);
    if (c->server) {
      x->headerBytes += namelen + valuelen + 32;
      if (x->headerBytes > c->engine->maxHeaderList_) return NGHTTP2_ERR_TEMPORAL_CALLBACK_FAILURE;
      if (frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        if (n == ":method") x->method = v;
        else if (n == ":path") x->path = v;
        else if (n == ":authority") x->authority = v;
        else if (n[0] != ':') {
          if (n == "content-type" && v.substr(0, 16) == "application/grpc") x->grpc = true;
          else if (n == "x-request-id") x->hasRequestId = true;
          else if (n == "host") x->hasHost = true;
          x->headers.Add(n, v);
        }
      } else {
        x->req.trailerFields.Add(n, v);
        x->req.trailers = true;
      }
      return 0;
    }
    // An upstream's answer: its status and fields, or its trailers.
    if (frame->headers.cat == NGHTTP2_HCAT_RESPONSE || (frame->headers.cat == NGHTTP2_HCAT_HEADERS && !x->answerHeaders)) {
      if (n == ":status") x->status = StatusOf(v);
      else if (n[0] != ':') x->answerFields.Add(n, v);
    } else {
      if (n == "grpc-status") x->grpcStatus = v;
      x->resp.trailerFields.Add(n, v);
      x->resp.trailers = true;
    }
    return 0;
  }

  static int OnFrameRecv(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    Conn* c = static_cast<Conn*>(user);
    H2Engine* e = c->engine;
    if (frame->hd.type == NGHTTP2_GOAWAY && !c->server) {
      e->Retire(c);
      return 0;
    }
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
    auto* x = StreamOf(user, session, frame->hd.stream_id);
    if (!x) return 0;
    bool end = (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) != 0;
    if (c->server) {
      if (frame->hd.type == NGHTTP2_HEADERS && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
        x->headersDone = true;
        // A request without an id gets one here (as it goes on, as JS sees it), made in C++: in JS
        // it was a string per request for the collector.
        if (!x->hasRequestId) {
          char id[36];
          NewRequestId(id);
          x->headers.Add("x-request-id", std::string_view(id, sizeof(id)));
          x->hasRequestId = true;
        }
        x->req.end = end;
        e->pendingRequests_.push_back(x->xid);
        return 0;
      }
      if (end) {
        x->req.end = true;
        e->Resume(x->up, x->upId, &x->req);
      }
      return 0;
    }
    if (frame->hd.type == NGHTTP2_HEADERS) {
      if (!x->answerHeaders) {
        if (x->status >= 100 && x->status < 200) {
          // Informational (100 Continue, 103 Early Hints): passed on as it came, before the answer.
          if (!x->downClosed && !x->responded && !x->dropping && x->status != 101) {
            std::string code = std::to_string(x->status);
            std::vector<nghttp2_nv> nv = {Nv(":status", code)};
            AddNvs(nv, x->answerFields);
            nghttp2_submit_headers(x->down->session, NGHTTP2_FLAG_NONE, x->downId, nullptr, nv.data(), nv.size(), nullptr);
            e->Touch(x->down);
          }
          x->answerFields.clear();
          x->status = 0;
          return 0;
        }
        x->answerHeaders = true;
        x->resp.end = end;
        if (x->retryable && std::find(x->retryOn.begin(), x->retryOn.end(), x->status) != x->retryOn.end() && e->AskRetry(x, x->status)) return 0;
        e->PassAnswer(x, end);
        return 0;
      }
    }
    if (end) {
      x->resp.end = true;
      e->Resume(x->down, x->downId, &x->resp);
    }
    return 0;
  }

  static int OnDataChunk(nghttp2_session* session, uint8_t, int32_t sid, const uint8_t* data, size_t len, void* user) {
    Conn* c = static_cast<Conn*>(user);
    H2Engine* e = c->engine;
    auto* x = StreamOf(user, session, sid);
    if (!x) {
      nghttp2_session_consume(session, sid, len);
      return 0;
    }
    if (c->server) {
      x->bytesIn += len;
      if (x->dropping || (x->grpc && !e->GrpcFits(x, data, len))) {
        nghttp2_session_consume(session, sid, len);
        return 0;
      }
      x->sawBody = true;
      x->req.buf.append(reinterpret_cast<const char*>(data), len);
      if (x->keep && x->keptWhole) {
        if (x->kept.size() + len <= kReplayLimit) x->kept.append(reinterpret_cast<const char*>(data), len);
        else x->keptWhole = false, x->kept.clear();
      }
      e->Resume(x->up, x->upId, &x->req);
      return 0;
    }
    if (x->downClosed || x->dropping) {
      nghttp2_session_consume(session, sid, len);
      return 0;
    }
    x->resp.buf.append(reinterpret_cast<const char*>(data), len);
    e->Resume(x->down, x->downId, &x->resp);
    return 0;
  }

  static int OnStreamClose(nghttp2_session* session, int32_t sid, uint32_t code, void* user) {
    Conn* c = static_cast<Conn*>(user);
    auto* x = StreamOf(user, session, sid);
    if (sid == c->seenSid) c->seenSid = 0, c->seenX = nullptr;
    if (!x) return 0;
    if (c->server) c->engine->DownstreamEnded(x, code);
    else if (x->up == c && x->upId == sid) c->engine->UpstreamEnded(x, code);
    return 0;
  }

  static int OnFrameSend(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    Conn* c = static_cast<Conn*>(user);
    // A client whose session ends for an error of its own: counted once (a flood was already).
    if (c->server && frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) c->engine->Refused(c, -static_cast<int>(frame->goaway.error_code));
    if (!c->server || (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) == 0) return 0;
    if (frame->hd.type != NGHTTP2_HEADERS && frame->hd.type != NGHTTP2_DATA) return 0;
    auto* x = StreamOf(user, session, frame->hd.stream_id);
    if (!x) return 0;
    x->respDone = true;
    // The answer is whole while the client still sends: its stream ends (RFC 9113 8.1).
    if (!x->req.end) {
      x->dropping = true;
      c->engine->CancelUpstream(x);
      nghttp2_submit_rst_stream(session, NGHTTP2_FLAG_NONE, frame->hd.stream_id, NGHTTP2_NO_ERROR);
    }
    return 0;
  }

  static int OnError(nghttp2_session*, int code, const char* msg, size_t, void* user) {
    Conn* c = static_cast<Conn*>(user);
    if (c->server) c->engine->Refused(c, code);
    return 0;
  }

  void Refused(Conn* c, int code) {
    if (c->refused) return;
    c->refused = true;
    pendingRefused_.push_back({c->id, code});
  }

  // -- sockets -------------------------------------------------------------------------------------

  Conn* Open(int fd, bool server, std::shared_ptr<Channel> ch = nullptr) {
    auto owned = std::make_unique<Conn>();
    Conn* c = owned.get();
    c->engine = this;
    c->fd = fd;
    c->server = server;
    c->exchanges.SetUpstream(!server);
    c->lastActive = NowMs();
    if (ch) {
      c->ch = std::move(ch);
      c->ch->Bind(0, c);
    } else {
      c->poll = new uv_poll_t;
      if (uv_poll_init(loop_, c->poll, fd) != 0) {
        delete c->poll;
        errno = EBADF;
        return nullptr;
      }
      c->poll->data = c;
      int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    if (server) nghttp2_session_server_new2(&c->session, callbacks_, c, options_);
    else nghttp2_session_client_new2(&c->session, callbacks_, c, options_);
    std::vector<nghttp2_settings_entry> iv = {{NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, static_cast<uint32_t>(kStreamWindow)}, {NGHTTP2_SETTINGS_ENABLE_PUSH, 0}};
    if (server) {
      iv.push_back({NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, kServerMaxStreams});
      iv.push_back({NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, maxHeaderList_});
    }
    nghttp2_submit_settings(c->session, NGHTTP2_FLAG_NONE, iv.data(), iv.size());
    nghttp2_session_set_local_window_size(c->session, NGHTTP2_FLAG_NONE, 0, kConnectionWindow);
    conns_[c] = std::move(owned);
    return c;
  }

  // Frames from the socket into the session; a protocol error ends the session (GOAWAY).
  void Receive(Conn* c, const uint8_t* data, size_t len) {
    if (c->closed) return;
    c->lastActive = NowMs();
    ssize_t rv = nghttp2_session_mem_recv(c->session, data, len);
    if (rv < 0) {
      if (c->server) Refused(c, static_cast<int>(rv));
      uint32_t code = rv == NGHTTP2_ERR_HEADER_COMP ? NGHTTP2_COMPRESSION_ERROR : rv == NGHTTP2_ERR_FLOODED ? NGHTTP2_INTERNAL_ERROR : NGHTTP2_PROTOCOL_ERROR;
      nghttp2_session_terminate_session(c->session, code);
    }
    Touch(c);
  }

  void Touch(Conn* c) {
    if (c->closed || c->dirty) return;
    c->dirty = true;
    dirty_.push_back(c);
  }

  // Frames out to the socket; the connection ends once its session wants nothing more.
  void Flush(Conn* c) {
    c->dirty = false;
    if (c->closed) return;
    for (;;) {
      while (c->outOff < c->out.size()) {
        ssize_t n;
        if (c->ch) {
          // A channel: as much as it has room for; it says when the stream took some.
          if (c->ch->PeerClosed(0)) return CloseConn(c);
          n = static_cast<ssize_t>(std::min(c->out.size() - c->outOff, c->ch->Room(0)));
          if (n == 0) break;
          c->ch->Write(0, c->out.data() + c->outOff, static_cast<size_t>(n));
        } else {
          n = send(c->fd, c->out.data() + c->outOff, c->out.size() - c->outOff, MSG_NOSIGNAL);
        }
        if (n > 0) {
          c->written += static_cast<uint64_t>(n);
          c->outOff += static_cast<size_t>(n);
          c->lastActive = NowMs();
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        CloseConn(c);
        return;
      }
      if (c->outOff == c->out.size()) c->out.clear(), c->outOff = 0;
      if (c->out.size() - c->outOff >= kHighWater) break;
      const uint8_t* data = nullptr;
      ssize_t n = nghttp2_session_mem_send(c->session, &data);
      if (n < 0) {
        CloseConn(c);
        return;
      }
      if (n == 0) break;
      c->out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
      // Gather more frames before a send, up to a bound.
      while (c->out.size() - c->outOff < kReadChunk) {
        n = nghttp2_session_mem_send(c->session, &data);
        if (n <= 0) break;
        c->out.append(reinterpret_cast<const char*>(data), static_cast<size_t>(n));
      }
      if (n < 0) {
        CloseConn(c);
        return;
      }
    }
    bool pending = c->outOff < c->out.size();
    if (!pending && !nghttp2_session_want_read(c->session) && !nghttp2_session_want_write(c->session)) {
      CloseConn(c);
      return;
    }
    if (c->ch) return;  // a channel tells of bytes and room itself
    int want = UV_READABLE | (pending ? UV_WRITABLE : 0);
    if (want != c->events) {
      c->events = want;
      uv_poll_start(c->poll, want, OnPoll);
    }
  }

  static void OnPoll(uv_poll_t* h, int status, int events) { OnEvents(static_cast<Conn*>(h->data), status, events); }

 public:
  // A channel's notice: as a poll's, readable and writable.
  static void OnChannel(Conn* c) { OnEvents(c, 0, UV_READABLE | UV_WRITABLE); }

 private:
  static void OnEvents(Conn* c, int status, int events) {
    H2Engine* e = c->engine;
    e->Enter();
    if (status < 0) {
      e->CloseConn(c);
    } else {
      if (events & UV_READABLE) e->Fill(c);
      if (!c->closed) e->Touch(c);
    }
    e->Leave();
  }

  void Fill(Conn* c) {
    if (c->ch) {
      // A channel: what the stream queued (a bound per turn; the rest on the next), then its end.
      Channel& ch = *c->ch;
      if (ch.WasReset(0)) return CloseConn(c);
      const std::string& in = ch.Inbox(0);
      size_t n = std::min(in.size(), 4 * kReadChunk);
      if (n > 0) {
        c->read += n;
        Receive(c, reinterpret_cast<const uint8_t*>(in.data()), n);
        if (c->closed) return;
        ch.Consumed(0, n);
      }
      if (!ch.Inbox(0).empty()) ch.Poke(0);
      else if (ch.AtEnd(0)) CloseConn(c);
      return;
    }
    static uint8_t buf[kReadChunk];
    for (int rounds = 0; rounds < 4 && !c->closed; rounds++) {
      ssize_t n = recv(c->fd, buf, sizeof buf, 0);
      if (n > 0) {
        c->read += static_cast<uint64_t>(n);
        Receive(c, buf, static_cast<size_t>(n));
        if (static_cast<size_t>(n) < sizeof buf) return;
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return;
      CloseConn(c);  // EOF or an error: its streams end with it
      return;
    }
  }

  // An upstream session takes no new stream; it ends (GOAWAY) once its streams did.
  void Retire(Conn* u) {
    if (u->server || u->retired) return;
    u->retired = true;
    auto it = pools_.find(u->pool);
    if (it != pools_.end()) {
      auto& list = it->second;
      list.erase(std::remove(list.begin(), list.end(), u), list.end());
      if (list.empty()) pools_.erase(it);
    }
    if (u->exchanges.empty()) Finish(u);
  }

  void Finish(Conn* c) {
    if (c->closed) return;
    nghttp2_session_terminate_session(c->session, NGHTTP2_NO_ERROR);
    Touch(c);
  }

  Conn* Usable(const std::string& pool) {
    auto it = pools_.find(pool);
    if (it == pools_.end()) return nullptr;
    for (Conn* u : it->second)
      if (!u->closed && !u->retired) return u;
    return nullptr;
  }

  void CloseConn(Conn* c) {
    if (c->closed) return;
    c->closed = true;
    if (!c->server) Retire(c);
    for (Exchange* x : c->exchanges.All()) {
      if (c->server) DownstreamEnded(x, NGHTTP2_CANCEL);
      else if (x->up == c) UpstreamEnded(x, NGHTTP2_INTERNAL_ERROR);
    }
    c->exchanges.Clear();
    if (c->ch) {
      c->ch->Close(0, false);
      c->ch.reset();
    }
    ClosePolled(c->poll, c->fd);
    if (c->server) {
      clients_.erase(c->id);
      pendingClosed_.push_back({c->id, c->read, c->written});
    }
    auto it = conns_.find(c);
    if (it != conns_.end()) {
      deadConns_.push_back(std::move(it->second));
      conns_.erase(it);
    }
  }

  // -- JS calls and the loop ------------------------------------------------------------------------

  void Enter() { depth_++; }

  // The loop's time in milliseconds (read once per turn, not a clock call per use): idle times,
  // routes' lifetimes.
  uint64_t NowMs() const { return uv_now(loop_); }

  // The outermost call: frames out, then what JS must hear (which may queue more frames).
  void Leave() {
    if (depth_ > 1) {
      depth_--;
      return;
    }
    for (;;) {
      while (!dirty_.empty()) {
        std::vector<Conn*> now;
        now.swap(dirty_);
        for (Conn* c : now) Flush(c);
      }
      if (pendingRequests_.empty() && pendingDone_.empty() && pendingClosed_.empty() && pendingRefused_.empty() && pendingDials_.empty()) break;
      Dispatch();
    }
    depth_--;
    if (depth_ == 0) {
      for (auto& x : graveyard_) Recycle(std::move(x));
      graveyard_.clear();
      for (auto& c : deadConns_)
        if (c->session) nghttp2_session_del(c->session), c->session = nullptr;
      deadConns_.clear();
    }
  }

  void Dispatch() {
    Napi::HandleScope scope(env_);
    std::vector<std::pair<uint64_t, int>> refused;
    refused.swap(pendingRefused_);
    for (auto& [id, code] : refused) Call(refused_, {Napi::Number::New(env_, static_cast<double>(id)), Napi::String::New(env_, Reason(code))});
    std::vector<uint64_t> requests;
    requests.swap(pendingRequests_);
    for (uint64_t xid : requests) {
      auto it = exchanges_.find(xid);
      if (it == exchanges_.end()) continue;
      Exchange* x = it->second.get();
      // Told even when the stream ended already (the client left, a message over the limit):
      // its decision is what its metrics are labelled with; forward() and respond() do nothing then.
      if (x->decided || ForwardDirect(x) || ForwardRouted(x)) continue;
      // One string: "host", the :authority, the fields, then :method and :path, joined by NUL.
      const std::string& fields = x->headers.bytes();
      std::string all;
      all.reserve(7 + x->authority.size() + fields.size() + x->method.size() + x->path.size());
      all += "host";
      all.push_back('\0');
      all += x->authority;
      all.push_back('\0');
      all += fields;  // each field's name and value followed by a NUL
      all += x->method;
      all.push_back('\0');
      all += x->path;
      Call(request_, {Napi::Number::New(env_, static_cast<double>(x->down->id)), Napi::Number::New(env_, static_cast<double>(xid)), NewLatin1(env_, all)});
    }
    std::vector<Dial> dials;
    dials.swap(pendingDials_);
    for (const Dial& d : dials)
      Call(dial_, {Napi::Number::New(env_, static_cast<double>(d.conn)), d.routes->record.Value(), Napi::Number::New(env_, d.target), Napi::Number::New(env_, d.endpoint)});
    std::vector<uint64_t> done;
    done.swap(pendingDone_);
    for (uint64_t xid : done) {
      auto it = exchanges_.find(xid);
      if (it == exchanges_.end()) continue;
      Exchange* x = it->second.get();
      if (!x->reported && x->direct) {
        x->reported = true;
        Unroute(x);
        // Told on the loop's next turn (FlushReports): its answer goes on first.
        reports_.push_back({x->down->id, x->respDone || x->responded ? x->status : 0, x->flag, x->bytesIn, x->bytesOut, x->grpc, x->grpcStatus,
                            static_cast<double>(uv_hrtime() - x->startedNs) / 1e6, x->routes, x->target, x->endpoint});
        if (reports_.size() == 1) uv_idle_start(reportIdle_, [](uv_idle_t* h) { static_cast<H2Engine*>(h->data)->FlushReports(); });
      } else if (!x->reported) {
        x->reported = true;
        Call(done_, {Napi::Number::New(env_, static_cast<double>(xid)), Napi::Number::New(env_, x->respDone || x->responded ? x->status : 0), Napi::String::New(env_, x->flag),
                     Napi::Number::New(env_, static_cast<double>(x->bytesIn)), Napi::Number::New(env_, static_cast<double>(x->bytesOut)), NewLatin1(env_, x->grpcStatus), Napi::String::New(env_, x->detail)});
      }
      Bury(x);
    }
    std::vector<Closed> closed;
    closed.swap(pendingClosed_);
    // A connection's reports go before its closed().
    if (!closed.empty() && !reports_.empty()) TellReports();
    for (const Closed& c : closed) Call(closed_, {Napi::Number::New(env_, static_cast<double>(c.id)), Napi::Number::New(env_, static_cast<double>(c.read)), Napi::Number::New(env_, static_cast<double>(c.written))});
  }

  // A library error (< -500), or a GOAWAY's error code negated.
  static std::string Reason(int code) {
    switch (code) {
      case -NGHTTP2_PROTOCOL_ERROR: return "h2_protocol_error";
      case -NGHTTP2_INTERNAL_ERROR: return "h2_internal_error";
      case -NGHTTP2_FLOW_CONTROL_ERROR: return "h2_flow_control_error";
      case -NGHTTP2_FRAME_SIZE_ERROR: return "h2_frame_size_error";
      case -NGHTTP2_COMPRESSION_ERROR: return "h2_compression_error";
      case -NGHTTP2_ENHANCE_YOUR_CALM: return "h2_enhance_your_calm";
      case NGHTTP2_ERR_FLOODED: return "h2_flood";
      case NGHTTP2_ERR_HEADER_COMP: return "h2_compression_error";
      case NGHTTP2_ERR_BAD_CLIENT_MAGIC: return "h2_bad_preface";
      case NGHTTP2_ERR_FLOW_CONTROL: return "h2_flow_control_error";
      default: return "h2_protocol_error";
    }
  }

  bool CallBool(Napi::FunctionReference& f, const std::initializer_list<napi_value>& args) {
    if (shutdown_) return false;
    try {
      Napi::Value v = f.MakeCallback(Value(), args, ctx_);
      return v.IsBoolean() && v.As<Napi::Boolean>().Value();
    } catch (const Napi::Error& e) {
      napi_fatal_exception(env_, e.Value());
      return false;
    }
  }

  void Call(Napi::FunctionReference& f, const std::initializer_list<napi_value>& args) {
    if (shutdown_) return;
    try {
      f.MakeCallback(Value(), args, ctx_);
    } catch (const Napi::Error& e) {
      napi_fatal_exception(env_, e.Value());
    }
  }

  // The streams the engine sent on by itself that ended are told to JS (delivered()) on the loop's
  // turn after they ended, not as they end: an answer that went into a channel reaches its HBONE
  // stream only after the loop's I/O callbacks (uv_check), which JS's counting would delay; and one
  // turn's reports go together. A client connection's reports go before its closed().
  void FlushReports() {
    uv_idle_stop(reportIdle_);
    if (reports_.empty()) return;
    Napi::HandleScope scope(env_);
    Enter();
    TellReports();
    Leave();
  }

  void TellReports() {
    std::vector<Report> now;
    now.swap(reports_);
    for (const Report& r : now) {
      napi_value routed[3];
      RoutedArgs(env_, r.routes, r.target, r.endpoint, routed);
      Call(delivered_, {Napi::Number::New(env_, static_cast<double>(r.conn)), Napi::Number::New(env_, r.status), Napi::String::New(env_, r.flag), Napi::Number::New(env_, static_cast<double>(r.bytesIn)),
                        Napi::Number::New(env_, static_cast<double>(r.bytesOut)), r.grpc ? NewLatin1(env_, r.grpcStatus) : env_.Undefined(), Napi::Number::New(env_, r.ms), routed[0], routed[1], routed[2]});
    }
  }

  // Once a second: client connections with no stream for idleMs, and upstream sessions with no
  // stream for poolIdleMs, end (GOAWAY).
  void Sweep() {
    Napi::HandleScope scope(env_);
    uint64_t now = NowMs();
    Enter();
    for (auto& [c, owned] : conns_) {
      if (c->closed || !c->exchanges.empty()) continue;
      int64_t idle = static_cast<int64_t>(now - c->lastActive);
      if (idle >= (c->server ? idleMs_ : poolIdleMs_)) {
        if (!c->server) Retire(c);
        Finish(c);
      }
    }
    Leave();
  }

  void Shutdown() {
    if (shutdown_) return;
    shutdown_ = true;
    for (auto& [c, owned] : conns_) {
      if (c->ch) c->ch->Close(0, true), c->ch.reset();
      ClosePolled(c->poll, c->fd);
      c->closed = true;
    }
    pools_.clear();
    clients_.clear();
    CloseHandle(timer_);
    CloseHandle(reportIdle_);
    if (depth_ == 0) {
      for (auto& [c, owned] : conns_)
        if (c->session) nghttp2_session_del(c->session), c->session = nullptr;
      exchanges_.clear();
      conns_.clear();
      graveyard_.clear();
      spare_.clear();
    }
  }

  Napi::Env env_;
  Napi::AsyncContext ctx_;
  Napi::FunctionReference request_, retry_, done_, delivered_, dial_, closed_, refused_;
  // What delivered() is to tell, on the loop's next turn (FlushReports).
  struct Report {
    uint64_t conn;
    int status;
    std::string flag;
    uint64_t bytesIn, bytesOut;
    bool grpc;
    std::string grpcStatus;
    double ms;
    std::shared_ptr<Routes> routes;
    uint32_t target, endpoint;
  };
  std::vector<Report> reports_;
  uv_idle_t* reportIdle_ = nullptr;
  nghttp2_session_callbacks* callbacks_ = nullptr;
  nghttp2_option* options_ = nullptr;
  uv_loop_t* loop_ = nullptr;
  uv_timer_t* timer_ = nullptr;
  int64_t idleMs_ = 3600000;
  int64_t poolIdleMs_ = 4000;
  uint32_t maxHeaderList_ = 16 * 1024;
  uint64_t grpcMax_ = 4 << 20;
  uint64_t nextXid_ = 0;
  int depth_ = 0;
  bool shutdown_ = false;
  std::unordered_map<Conn*, std::unique_ptr<Conn>> conns_;
  std::unordered_map<uint64_t, Conn*> clients_;
  std::map<std::string, std::vector<Conn*>> pools_;
  std::unordered_map<uint64_t, std::unique_ptr<Exchange>> exchanges_;
  RouteBook routeBook_;
  // Routed streams waiting for a session, by pool; the pools JS is to dial (dial() events).
  std::unordered_map<std::string, std::vector<uint64_t>> waiting_;
  struct Dial {
    uint64_t conn;
    std::shared_ptr<Routes> routes;
    uint32_t target, endpoint;
  };
  std::vector<Dial> pendingDials_;
  std::vector<Conn*> dirty_;
  std::vector<uint64_t> pendingRequests_, pendingDone_;
  struct Closed {
    uint64_t id, read, written;
  };
  std::vector<Closed> pendingClosed_;
  std::vector<std::pair<uint64_t, int>> pendingRefused_;
  // Objects that ended while a call up the stack may still hold them.
  std::vector<std::unique_ptr<Exchange>> graveyard_;
  std::vector<std::unique_ptr<Exchange>> spare_;
  static constexpr size_t kSpareExchanges = 512;
  static constexpr size_t kSpareBytes = 16 * 1024;
  std::vector<std::unique_ptr<Conn>> deadConns_;
};

// The exchange is looked up by the stream, not kept in the provider: a stream given up (its
// user data cleared) may still be asked once before its RST_STREAM goes.
ssize_t ReadRequestBody(nghttp2_session* session, int32_t sid, uint8_t* buf, size_t length, uint32_t* flags, nghttp2_data_source*, void* user) {
  auto* x = StreamOf(user, session, sid);
  if (!x) return NGHTTP2_ERR_DEFERRED;
  return static_cast<ssize_t>(static_cast<Conn*>(user)->engine->RequestBody(x, buf, length, flags));
}

ssize_t ReadAnswerBody(nghttp2_session* session, int32_t sid, uint8_t* buf, size_t length, uint32_t* flags, nghttp2_data_source*, void* user) {
  auto* x = StreamOf(user, session, sid);
  if (!x) return NGHTTP2_ERR_DEFERRED;
  return static_cast<ssize_t>(static_cast<Conn*>(user)->engine->AnswerBody(x, buf, length, flags));
}

void Conn::ChannelChanged() { H2Engine::OnChannel(this); }

}  // namespace

Napi::Object InitH2(Napi::Env env, Napi::Object exports) {
  exports.Set("H2Engine", H2Engine::Define(env));
  return exports;
}

}  // namespace nodemesh
