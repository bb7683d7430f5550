// SPDX-License-Identifier: Apache-2.0
// HTTP/1.1 framing and forwarding for the node proxy's L7 path (issue 14), on the JS thread's own
// event loop (libuv polls on the sockets, no thread hop): each request's head is parsed here and
// handed to JS once, which answers with where it goes (a pooled upstream connection and the head
// to send) or with the proxy's own answer; bodies, the answer's head and body, keep-alive and the
// upstream pools stay here. JS is told how each request ended (status, body bytes) for metrics.
//
// The parser is strict (RFC 9112): a bad request line, a header name that is not a token, a value
// with control bytes, obs-fold, Content-Length with Transfer-Encoding, differing Content-Lengths,
// a Transfer-Encoding whose last coding is not chunked, a malformed chunk: 400 and the connection
// closes; a head over the limit: 431. Nothing of such a request goes upstream.
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#include <uv.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

#include "channel.h"
#include "common.h"
#include "gate.h"
#include "routes.h"

namespace nodemesh {

namespace {

constexpr size_t kReadChunk = 64 * 1024;
// Bytes queued for a peer above which the other side stops being read (backpressure).
constexpr size_t kHighWater = 256 * 1024;
constexpr uint64_t kNoLength = ~uint64_t{0};
constexpr size_t kReplayLimit = 64 * 1024;  // a request body kept for a retry (as node:http's path keeps it)

uint64_t NowMs() { return uv_hrtime() / 1000000; }

// ---------------------------------------------------------------------------------------------
// Parsing

bool IsTchar(unsigned char c) {
  if (c >= '0' && c <= '9') return true;
  if ((c | 0x20) >= 'a' && (c | 0x20) <= 'z') return true;
  return c != 0 && strchr("!#$%&'*+-.^_`|~", c) != nullptr;
}

// field-vchar / SP / HTAB / obs-text: no control bytes but HTAB.
bool IsValueByte(unsigned char c) { return c == '\t' || (c >= 0x20 && c != 0x7f); }

// `a` equals `lower` (lower-case) but for the case of ASCII letters.
bool IEqualsLower(std::string_view a, std::string_view lower) {
  if (a.size() != lower.size()) return false;
  for (size_t i = 0; i < a.size(); i++)
    if ((a[i] >= 'A' && a[i] <= 'Z' ? a[i] | 0x20 : a[i]) != lower[i]) return false;
  return true;
}

bool IEquals(const std::string& a, const char* b) {
  size_t n = strlen(b);
  if (a.size() != n) return false;
  for (size_t i = 0; i < n; i++)
    if (tolower(static_cast<unsigned char>(a[i])) != b[i]) return false;
  return true;
}

std::string Lower(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(tolower(static_cast<unsigned char>(ch)));
  return s;
}

// Whether `test` holds for a token of a comma-separated header value (blanks around it trimmed).
template <typename F>
bool AnyToken(const std::string& value, F&& test) {
  size_t i = 0;
  while (i <= value.size()) {
    size_t comma = value.find(',', i);
    if (comma == std::string::npos) comma = value.size();
    size_t a = i, b = comma;
    while (a < b && (value[a] == ' ' || value[a] == '\t')) a++;
    while (b > a && (value[b - 1] == ' ' || value[b - 1] == '\t')) b--;
    if (test(value.substr(a, b - a))) return true;
    i = comma + 1;
  }
  return false;
}

// Whether a comma-separated header value holds `token` (case-insensitive).
bool HasToken(const std::string& value, const char* token) {
  return AnyToken(value, [token](const std::string& t) { return IEquals(t, token); });
}

// A field of one hop only, never passed on (RFC 9110 7.6.1; Transfer-Encoding is the framing's,
// each side of the proxy its own).
bool HopByHop(const std::string& name) {
  return IEquals(name, "connection") || IEquals(name, "keep-alive") || IEquals(name, "proxy-connection") || IEquals(name, "upgrade") || IEquals(name, "te");
}

struct Head {
  // Request: method, target; answer: status, reason.
  std::string method, target, reason;
  int status = 0;
  int minor = 1;
  std::vector<std::pair<std::string, std::string>> headers;
  uint64_t contentLength = kNoLength;
  bool chunked = false;
  bool close = false;      // Connection: close (or HTTP/1.0 without keep-alive)
  bool upgrade = false;    // an Upgrade header, or CONNECT
  size_t length = 0;       // bytes of the head, CRLFCRLF included
};

enum class Parsed { kMore, kDone, kBad, kTooLarge };

// One line ending in CRLF at `at`; a bare LF or CR is an error (no lenient line endings).
Parsed Line(const std::string& buf, size_t at, size_t limit, size_t* end) {
  for (size_t i = at; i < buf.size(); i++) {
    if (i - at > limit) return Parsed::kTooLarge;
    if (buf[i] == '\n') return Parsed::kBad;
    if (buf[i] == '\r') {
      if (i + 1 >= buf.size()) return Parsed::kMore;
      if (buf[i + 1] != '\n') return Parsed::kBad;
      *end = i;
      return Parsed::kDone;
    }
  }
  return buf.size() - at > limit ? Parsed::kTooLarge : Parsed::kMore;
}

bool ParseVersion(const std::string& v, int* minor) {
  if (v == "HTTP/1.1") *minor = 1;
  else if (v == "HTTP/1.0") *minor = 0;
  else return false;
  return true;
}

// The head (request or answer) at the start of `buf`, at most `limit` bytes.
Parsed ParseHead(const std::string& buf, bool request, size_t limit, Head* h, std::string* why) {
  size_t end = 0;
  Parsed p = Line(buf, 0, limit, &end);
  if (p != Parsed::kDone) {
    if (p == Parsed::kBad) *why = "HPE_INVALID_REQUEST_LINE: malformed start line";
    return p;
  }
  std::string first = buf.substr(0, end);
  size_t sp1 = first.find(' ');
  size_t sp2 = sp1 == std::string::npos ? std::string::npos : first.find(' ', sp1 + 1);
  if (sp2 == std::string::npos) return *why = "HPE_INVALID_REQUEST_LINE: malformed start line", Parsed::kBad;
  if (request) {
    h->method = first.substr(0, sp1);
    h->target = first.substr(sp1 + 1, sp2 - sp1 - 1);
    if (h->method.empty()) return *why = "HPE_INVALID_METHOD: empty method", Parsed::kBad;
    for (unsigned char c : h->method)
      if (!IsTchar(c)) return *why = "HPE_INVALID_METHOD: method is not a token", Parsed::kBad;
    if (h->target.empty()) return *why = "HPE_INVALID_URL: empty request target", Parsed::kBad;
    for (unsigned char c : h->target)
      if (c <= 0x20 || c >= 0x7f) return *why = "HPE_INVALID_URL: request target has a byte outside visible ASCII", Parsed::kBad;
    if (!ParseVersion(first.substr(sp2 + 1), &h->minor)) return *why = "HPE_INVALID_VERSION: not HTTP/1.0 or HTTP/1.1", Parsed::kBad;
    if (h->method == "CONNECT") h->upgrade = true;
  } else {
    if (!ParseVersion(first.substr(0, sp1), &h->minor)) return *why = "HPE_INVALID_VERSION: not HTTP/1.0 or HTTP/1.1", Parsed::kBad;
    std::string code = first.substr(sp1 + 1, sp2 - sp1 - 1);
    if (code.size() != 3 || code.find_first_not_of("0123456789") != std::string::npos) return *why = "HPE_INVALID_STATUS: bad status code", Parsed::kBad;
    h->status = std::stoi(code);
    if (h->status < 100) return *why = "HPE_INVALID_STATUS: bad status code", Parsed::kBad;
    h->reason = first.substr(sp2 + 1);
    for (unsigned char c : h->reason)
      if (!IsValueByte(c)) return *why = "HPE_INVALID_STATUS: bad reason phrase", Parsed::kBad;
  }
  size_t at = end + 2;
  bool keepAlive = false, closeToken = false, sawTe = false;
  for (;;) {
    p = Line(buf, at, limit, &end);
    if (p == Parsed::kMore && buf.size() > limit) p = Parsed::kTooLarge;
    if (p != Parsed::kDone) {
      if (p == Parsed::kBad) *why = "HPE_INVALID_HEADER_TOKEN: malformed header line";
      return p;
    }
    if (end + 2 > limit) return Parsed::kTooLarge;
    if (end == at) {
      h->length = end + 2;
      break;
    }
    if (buf[at] == ' ' || buf[at] == '\t') return *why = "HPE_INVALID_HEADER_TOKEN: obs-fold (a header line that starts with whitespace)", Parsed::kBad;
    size_t colon = buf.find(':', at);
    if (colon == std::string::npos || colon >= end || colon == at) return *why = "HPE_INVALID_HEADER_TOKEN: header line without a name", Parsed::kBad;
    for (size_t i = at; i < colon; i++)
      if (!IsTchar(static_cast<unsigned char>(buf[i]))) return *why = "HPE_INVALID_HEADER_TOKEN: header name is not a token", Parsed::kBad;
    size_t v = colon + 1, ve = end;
    while (v < ve && (buf[v] == ' ' || buf[v] == '\t')) v++;
    while (ve > v && (buf[ve - 1] == ' ' || buf[ve - 1] == '\t')) ve--;
    for (size_t i = v; i < ve; i++)
      if (!IsValueByte(static_cast<unsigned char>(buf[i]))) return *why = "HPE_INVALID_HEADER_TOKEN: header value has a control byte", Parsed::kBad;
    std::string name = buf.substr(at, colon - at), value = buf.substr(v, ve - v);
    if (IEquals(name, "content-length")) {
      if (value.empty() || value.size() > 18 || value.find_first_not_of("0123456789") != std::string::npos) return *why = "HPE_INVALID_CONTENT_LENGTH: bad Content-Length", Parsed::kBad;
      uint64_t n = std::stoull(value);
      if (h->contentLength != kNoLength && h->contentLength != n) return *why = "HPE_UNEXPECTED_CONTENT_LENGTH: differing Content-Lengths", Parsed::kBad;
      h->contentLength = n;
    } else if (IEquals(name, "transfer-encoding")) {
      // The last coding must be chunked (RFC 9112 6.3); anything else cannot be framed.
      size_t last = value.rfind(',');
      std::string coding = value.substr(last == std::string::npos ? 0 : last + 1);
      size_t a = coding.find_first_not_of(" \t");
      coding = a == std::string::npos ? "" : coding.substr(a);
      if (!IEquals(coding, "chunked") || sawTe) return *why = "HPE_INVALID_TRANSFER_ENCODING: Transfer-Encoding is not chunked", Parsed::kBad;
      if (value != coding && request) return *why = "HPE_INVALID_TRANSFER_ENCODING: Transfer-Encoding other than chunked", Parsed::kBad;
      sawTe = true;
      h->chunked = true;
    } else if (IEquals(name, "connection")) {
      if (HasToken(value, "close")) closeToken = true;
      if (HasToken(value, "keep-alive")) keepAlive = true;
      if (HasToken(value, "upgrade")) h->upgrade = h->upgrade || request;
    } else if (IEquals(name, "upgrade") && request) {
      h->upgrade = true;
    }
    h->headers.emplace_back(std::move(name), std::move(value));
    at = end + 2;
  }
  if (h->chunked && h->contentLength != kNoLength) {
    // A request with both is a smuggling attempt; an answer with both is framed by chunked (RFC 9112 6.3).
    if (request) return *why = "HPE_UNEXPECTED_CONTENT_LENGTH: Content-Length with Transfer-Encoding", Parsed::kBad;
    h->contentLength = kNoLength;
  }
  if (h->chunked && h->minor == 0 && request) return *why = "HPE_INVALID_TRANSFER_ENCODING: Transfer-Encoding in HTTP/1.0", Parsed::kBad;
  h->close = closeToken || (h->minor == 0 && !keepAlive);
  return Parsed::kDone;
}

// A chunked body passed through as it is, checked as it goes: chunk sizes in hex (an extension
// after ';' allowed), CRLF after each chunk's data, trailer lines, the empty line that ends it.
class Chunked {
 public:
  enum class Step { kMore, kDone, kBad };

  // Takes what it can of `in` from `at`; `*used` is how many bytes belong to the body, `*data`
  // how many of them are payload.
  Step Feed(const std::string& in, size_t at, size_t* used, uint64_t* data) {
    size_t i = at;
    *data = 0;
    for (;;) {
      if (state_ == kData) {
        size_t n = static_cast<size_t>(std::min<uint64_t>(left_, in.size() - i));
        i += n;
        left_ -= n;
        *data += n;
        if (left_ > 0) break;
        state_ = kDataEnd;
        continue;
      }
      size_t end = 0;
      Parsed p = Line(in, i, 4096, &end);
      if (p == Parsed::kMore) break;
      if (p != Parsed::kDone) return Step::kBad;
      if (state_ == kSize) {
        size_t semi = in.find(';', i);
        size_t digitsEnd = (semi != std::string::npos && semi < end) ? semi : end;
        if (digitsEnd == i || digitsEnd - i > 15) return Step::kBad;
        uint64_t n = 0;
        for (size_t k = i; k < digitsEnd; k++) {
          char ch = in[k];
          int d = ch >= '0' && ch <= '9' ? ch - '0' : (ch | 0x20) >= 'a' && (ch | 0x20) <= 'f' ? (ch | 0x20) - 'a' + 10 : -1;
          if (d < 0) return Step::kBad;
          n = n * 16 + static_cast<uint64_t>(d);
        }
        for (size_t k = digitsEnd; k < end; k++)
          if (!IsValueByte(static_cast<unsigned char>(in[k]))) return Step::kBad;
        i = end + 2;
        if (n == 0) state_ = kTrailers;
        else left_ = n, state_ = kData;
      } else if (state_ == kDataEnd) {
        if (end != i) return Step::kBad;
        i = end + 2;
        state_ = kSize;
      } else {  // trailers: header lines, then the empty line that ends the body
        if (end == i) {
          i = end + 2;
          state_ = kSize;
          *used = i - at;
          return Step::kDone;
        }
        size_t colon = in.find(':', i);
        if (colon == std::string::npos || colon >= end || colon == i) return Step::kBad;
        for (size_t k = i; k < colon; k++)
          if (!IsTchar(static_cast<unsigned char>(in[k]))) return Step::kBad;
        for (size_t k = colon + 1; k < end; k++)
          if (!IsValueByte(static_cast<unsigned char>(in[k]))) return Step::kBad;
        i = end + 2;
      }
    }
    *used = i - at;
    return Step::kMore;
  }

 private:
  enum { kSize, kData, kDataEnd, kTrailers } state_ = kSize;
  uint64_t left_ = 0;
};


// ---------------------------------------------------------------------------------------------
// The engine

enum class BodyKind { kNone, kLength, kChunked, kUntilClose };

// A body as it is read: its framing and how much of it has passed.
struct Framing {
  BodyKind kind = BodyKind::kNone;
  uint64_t left = 0;
  Chunked chunked;
  uint64_t bytes = 0;  // payload bytes
  bool done = true;

  void Start(BodyKind k, uint64_t length) {
    kind = k;
    left = length;
    chunked = Chunked();
    bytes = 0;
    done = k == BodyKind::kNone || (k == BodyKind::kLength && length == 0);
  }

  // Moves what belongs to the body from the front of `in` to `out` (or drops it when `out` is
  // null). False on a malformed chunk.
  bool Pump(std::string* in, std::string* out, bool eof) {
    if (done || in->empty()) {
      if (!done && eof && kind == BodyKind::kUntilClose) done = true;
      return true;
    }
    size_t used = 0;
    if (kind == BodyKind::kLength) {
      used = static_cast<size_t>(std::min<uint64_t>(left, in->size()));
      left -= used;
      bytes += used;
      done = left == 0;
    } else if (kind == BodyKind::kChunked) {
      uint64_t data = 0;
      Chunked::Step step = chunked.Feed(*in, 0, &used, &data);
      if (step == Chunked::Step::kBad) return false;
      bytes += data;
      done = step == Chunked::Step::kDone;
    } else {
      used = in->size();
      bytes += used;
    }
    if (out) out->append(*in, 0, used);
    in->erase(0, used);
    if (!done && eof && kind == BodyKind::kUntilClose && in->empty()) done = true;
    return true;
  }
};

class Http1Engine;
struct Client;
struct Upstream;

// One socket on the loop (or an upstream's channel to an HBONE stream, side 0 here): what was
// read and not yet used, what waits to be written.
struct Peer final : ChannelEnd {
  Http1Engine* engine = nullptr;
  uv_poll_t* poll = nullptr;
  int fd = -1;
  std::shared_ptr<Channel> ch;
  void ChannelChanged() override;
  int events = 0;
  bool isClient = false;
  Client* client = nullptr;      // whose socket this is
  Upstream* upstream = nullptr;
  bool eof = false;
  bool closed = false;
  std::string in, out;
  uint64_t read = 0, written = 0;  // bytes the engine read from and wrote to the socket itself
};

struct Client {
  Peer peer;
  uint64_t id = 0;
  // kTunnel: an upgrade answered 101; bytes pass as they are both ways until both sides ended.
  enum class Phase { kHead, kDecide, kExchange, kTunnel, kClosing } phase = Phase::kHead;
  Head req;
  Framing body;
  Upstream* up = nullptr;
  bool answered = false;  // the answer is whole (from upstream or the proxy)
  bool closeAfter = false;
  bool headRequest = false;
  bool reportAtEnd = false;  // answered by the proxy: done() when the request was read whole
  std::string rawHead;       // the request's head as the client sent it (sent again: see retry)
  bool idleRetried = false;
  bool retryable = false;    // a route's retry applies: JS is asked (retry) before an answer or a reset ends it
  bool keepBody = false;     // the body is kept as it is sent (a retry sends it again), while under kReplayLimit
  bool resend = false;       // Requeue()d: the next forward() sends the same request again
  std::string replay;        // the body as sent so far (its framing included), while keepBody
  std::vector<int> retryOn;  // the codes it retries on
  std::vector<std::string> answerRemove;  // lower-case names
  std::string answerAdd;                  // "name: value\r\n" lines
  uint64_t lastActive = 0;  // the last byte either way, on either side
  uint64_t headSince = 0;   // when the first byte of the head being read came (0: none yet)
  uint64_t bytesOut = 0;
  int status = 0;
  bool upgrading = false;  // a request with Upgrade: on a connection of its own, a 101 joins the two
  bool clientDone = false, upstreamDone = false;  // a tunnel's sides that ended (their FIN passed on)
  // Released to JS while it came on a channel: its bytes pass (a tunnel) to a socket pair whose
  // other end JS serves; nothing of it is reported any more (JS's connection is that socket's).
  bool bridge = false;
  // Requests that go on without asking JS (forward()'s `gate`): their pool (empty: JS decides
  // each), and which of them may. `unread`: the request in flight went so (reported in
  // delivered(), not done()), since `startedNs`.
  std::string direct;
  Gate gate;
  bool unread = false;
  uint64_t startedNs = 0;
  // The connection's routes (route()): its later requests that they route go on without asking
  // JS. The request in flight that went so: its routes, backend (a target of them) and endpoint,
  // and while it waits for the connection JS dials for it (a dial() event), that pool.
  std::shared_ptr<Routes> routes;
  std::shared_ptr<Routes> routed;
  uint32_t target = 0, endpoint = 0;
  std::string waitingPool;
};

struct Upstream {
  Peer peer;
  std::string pool;
  Client* client = nullptr;
  bool headDone = false;
  Head answer;
  Framing body;
  bool reusable = false;
  bool reused = false;  // taken idle from its pool (not dialled for this request)
  uint32_t served = 0;       // answers it carried
  uint32_t maxRequests = 0;  // it closes after this many (0: no limit)
  uint64_t idleSince = 0;
};

class Http1Engine : public Napi::ObjectWrap<Http1Engine> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Http1Engine",
                       {
                           InstanceMethod<&Http1Engine::Serve>("serve"),
                           InstanceMethod<&Http1Engine::Forward>("forward"),
                           InstanceMethod<&Http1Engine::Respond>("respond"),
                           InstanceMethod<&Http1Engine::Expire>("expire"),
                           InstanceMethod<&Http1Engine::Abandon>("abandon"),
                           InstanceMethod<&Http1Engine::KeptBody>("keptBody"),
                           InstanceMethod<&Http1Engine::Release>("release"),
                           InstanceMethod<&Http1Engine::CloseJs>("close"),
                           InstanceMethod<&Http1Engine::DropPools>("dropPools"),
                           InstanceMethod<&Http1Engine::Undirect>("undirect"),
                           InstanceMethod<&Http1Engine::Route>("route"),
                           InstanceMethod<&Http1Engine::InFlight>("inFlight"),
                           InstanceMethod<&Http1Engine::Attach>("attach"),
                           InstanceMethod<&Http1Engine::DialFailed>("dialFailed"),
                           InstanceMethod<&Http1Engine::Stats>("stats"),
                           InstanceMethod<&Http1Engine::Destroy>("destroy"),
                       });
  }

  // new Http1Engine({head, retry, done, delivered, dial, closed}, {maxHeadBytes, idleMs, headTimeoutMs, poolIdleMs, maxIdlePerPool})
  explicit Http1Engine(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Http1Engine>(info), env_(info.Env()), ctx_(info.Env(), "nodemesh:http1") {
    Napi::Object cb = info[0].As<Napi::Object>();
    head_ = Napi::Persistent(cb.Get("head").As<Napi::Function>());
    retry_ = Napi::Persistent(cb.Get("retry").As<Napi::Function>());
    done_ = Napi::Persistent(cb.Get("done").As<Napi::Function>());
    delivered_ = Napi::Persistent(cb.Get("delivered").As<Napi::Function>());
    dial_ = Napi::Persistent(cb.Get("dial").As<Napi::Function>());
    closed_ = Napi::Persistent(cb.Get("closed").As<Napi::Function>());
    Napi::Object o = info[1].As<Napi::Object>();
    maxHead_ = o.Get("maxHeadBytes").As<Napi::Number>().Uint32Value();
    idleMs_ = o.Get("idleMs").As<Napi::Number>().Int64Value();
    headMs_ = o.Get("headTimeoutMs").As<Napi::Number>().Int64Value();
    poolIdleMs_ = o.Get("poolIdleMs").As<Napi::Number>().Int64Value();
    maxIdlePerPool_ = o.Get("maxIdlePerPool").As<Napi::Number>().Uint32Value();
    napi_get_uv_event_loop(env_, &loop_);
    timer_ = new uv_timer_t;
    uv_timer_init(loop_, timer_);
    timer_->data = this;
    uv_timer_start(timer_, [](uv_timer_t* t) { static_cast<Http1Engine*>(t->data)->Sweep(); }, 1000, 1000);
    uv_unref(reinterpret_cast<uv_handle_t*>(timer_));
    reportIdle_ = new uv_idle_t;
    uv_idle_init(loop_, reportIdle_);
    reportIdle_->data = this;
  }

  ~Http1Engine() override { Shutdown(); }

 private:
  // -- JS methods --------------------------------------------------------------------------------

  // serve(id, fd, initial?): the engine owns the accepted client socket from now on, under the
  // id JS gave it; `initial` is what was read from it already (a sniffed connection's first bytes).
  // Or serve(id, {channel}): the client is an HBONE stream's, joined in memory (side 0 here).
  Napi::Value Serve(const Napi::CallbackInfo& info) {
    auto c = std::make_unique<Client>();
    c->id = static_cast<uint64_t>(info[0].As<Napi::Number>().Int64Value());
    if (clients_.count(c->id) != 0) throw Napi::Error::New(info.Env(), "http1 engine: id " + std::to_string(c->id) + " is in use");
    c->lastActive = NowMs();
    Client* raw = c.get();
    if (std::shared_ptr<Channel> ch = ChannelArg(info[1], 0, "http1 engine")) {
      OpenChannel(&raw->peer, std::move(ch), true);
    } else if (!Open(&raw->peer, info[1].As<Napi::Number>().Int32Value(), true)) {
      throw ToJsError(info.Env(), {errno, "uv_poll_init", "", ""});
    }
    clients_[c->id] = std::move(c);
    raw->peer.client = raw;
    if (info.Length() > 2 && info[2].IsBuffer()) {
      auto b = info[2].As<Napi::Buffer<char>>();
      raw->peer.in.append(b.Data(), b.Length());
    }
    depth_++;
    AdvanceClient(raw);
    depth_--;
    return info.Env().Undefined();
  }

  // undirect(): every request from now on is JS's to decide again (the config changed).
  Napi::Value Undirect(const Napi::CallbackInfo& info) {
    for (auto& [id, c] : clients_) c->direct.clear(), c->gate = Gate(), c->routes.reset();
    routeBook_.Clear();
    return info.Env().Undefined();
  }

  // route(id, routes): the connection's later requests are routed here by `routes` (EngineRoutes),
  // each reported in delivered(); without `routes`, each is JS's to decide. Routes are read once
  // per id until undirect().
  Napi::Value Route(const Napi::CallbackInfo& info) {
    Client* c = Find(info[0]);
    if (c) c->routes = routeBook_.Get(info[1], NowMs());
    return info.Env().Undefined();
  }

  // inFlight(key): requests to the backend Service `key` the engine routed itself that are in flight.
  Napi::Value InFlight(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), routeBook_.InFlight(info[0].As<Napi::String>().Utf8Value()));
  }

  // attach(id, fd | {channel}): the connection JS dialled for the routed request waiting on `id`
  // (a dial() event): the request goes out on it, and it joins its pool afterwards. False when no
  // request waits for it (the connection is closed).
  Napi::Value Attach(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Client* c = Find(info[0]);
    std::shared_ptr<Channel> ch = ChannelArg(info[1], 0, "http1 engine");
    int fd = ch ? -1 : info[1].As<Napi::Number>().Int32Value();
    if (!c || c->phase != Client::Phase::kDecide || c->waitingPool.empty()) {
      if (fd >= 0) close(fd);
      if (ch) ch->Close(0, true);
      return Napi::Boolean::New(env, false);
    }
    Upstream* u = NewUpstream(env, fd, std::move(ch), c->waitingPool);
    c->waitingPool.clear();
    depth_++;
    SendAsItCame(c, u, false);
    depth_--;
    return Napi::Boolean::New(env, true);
  }

  // dialFailed(id): no connection comes for the routed request waiting on `id`: it is JS's to decide (a head() event).
  Napi::Value DialFailed(const Napi::CallbackInfo& info) {
    Client* c = Find(info[0]);
    if (c && c->phase == Client::Phase::kDecide && !c->waitingPool.empty()) {
      c->waitingPool.clear();
      depth_++;
      GiveBack(c);
      depth_--;
    }
    return info.Env().Undefined();
  }

  // forward(id, pool, head, fd, answerRemove, answerAdd, maxRequests?, retryOn?, keep?, gate?): the request goes upstream, on `fd` (a
  // new connection, kept in `pool` afterwards) or, with fd -1, on an idle one of `pool`. False
  // when there is none (the caller dials and calls again with the fd).
  Napi::Value Forward(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Client* c = Find(info[0]);
    // A new connection: an fd, or {channel} (an HBONE stream's, joined in memory); -1: an idle one.
    std::shared_ptr<Channel> ch = ChannelArg(info[3], 0, "http1 engine");
    int fd = ch ? -1 : info[3].As<Napi::Number>().Int32Value();
    bool fresh = fd >= 0 || ch;
    if (!c || c->phase != Client::Phase::kDecide || !c->waitingPool.empty()) {
      // The client went while the upstream was dialled (or its request is the engine's): the connection is not needed.
      if (fd >= 0) close(fd);
      if (ch) ch->Close(0, true);
      return Napi::Boolean::New(env, true);
    }
    std::string pool = info[1].As<Napi::String>().Utf8Value();
    // An upgrade goes on a connection of its own (it may become a tunnel): never an idle one.
    bool upgrading = c->req.upgrade && c->req.method != "CONNECT";
    if (upgrading && !fresh) return Napi::Boolean::New(env, false);
    Upstream* u = nullptr;
    if (fresh) {
      u = NewUpstream(env, fd, std::move(ch), pool);
    } else {
      u = TakeIdle(pool);
      if (!u) return Napi::Boolean::New(env, false);
    }
    c->answerRemove.clear();
    Napi::Array remove = info[4].As<Napi::Array>();
    for (uint32_t i = 0; i < remove.Length(); i++) c->answerRemove.push_back(Lower(remove.Get(i).As<Napi::String>().Utf8Value()));
    c->answerAdd = Latin1(info[5]);
    Link(c, u, upgrading, !fresh, info.Length() > 6 && info[6].IsNumber() ? info[6].As<Napi::Number>().Uint32Value() : 0);
    c->retryable = info.Length() > 7 && info[7].IsArray();
    c->retryOn.clear();
    if (c->retryable) {
      Napi::Array codes = info[7].As<Napi::Array>();
      for (uint32_t i = 0; i < codes.Length(); i++) c->retryOn.push_back(codes.Get(i).As<Napi::Number>().Int32Value());
    }
    if (!c->resend) {
      // A request with a body that a retry may send again keeps it as it goes; so does one JS
      // asks to keep (a mirror sends a copy: keptBody()).
      bool keep = info.Length() > 8 && info[8].ToBoolean().Value();
      c->keepBody = (c->retryable || keep) && c->body.kind != BodyKind::kNone;
      c->replay.clear();
    }
    c->resend = false;
    // With a `gate` (what JS would pass on as it came on this connection), the connection's later
    // requests that it passes go the same way without asking JS (ForwardDirect); undirect() ends that.
    if (info.Length() > 9 && info[9].IsObject()) {
      ReadGate(info[9].As<Napi::Object>(), c->gate);
      c->direct = pool;
    } else {
      c->direct.clear();
    }
    depth_++;
    Send(c, Latin1(info[2]));
    depth_--;
    return Napi::Boolean::New(env, true);
  }

  // A new upstream connection of `pool`: the socket `fd`, or `ch` (an HBONE stream's, joined in memory).
  Upstream* NewUpstream(Napi::Env env, int fd, std::shared_ptr<Channel> ch, const std::string& pool) {
    auto made = std::make_unique<Upstream>();
    Upstream* u = made.get();
    if (ch) {
      OpenChannel(&u->peer, std::move(ch), false);
    } else if (!Open(&u->peer, fd, false)) {
      close(fd);
      throw ToJsError(env, {errno, "uv_poll_init", "", ""});
    }
    u->peer.upstream = u;
    upstreams_[u] = std::move(made);
    u->pool = pool;
    return u;
  }

  // The request's attempt takes `u` (reused: an idle connection of its pool).
  static void Link(Client* c, Upstream* u, bool upgrading, bool reused, uint32_t maxRequests) {
    c->up = u;
    c->upgrading = upgrading;
    u->client = c;
    u->headDone = false;
    u->answer = Head();
    u->reusable = false;
    u->reused = reused;
    u->maxRequests = maxRequests;
  }

  // The request goes out on its upstream (c->up) with `head`, its body as it comes.
  void Send(Client* c, const std::string& head) {
    c->rawHead.assign(c->peer.in, 0, c->req.length);
    c->up->peer.out.append(head);
    c->peer.in.erase(0, c->req.length);
    c->phase = Client::Phase::kExchange;
    PumpRequest(c);
  }

  // Whether the request may go on without JS as it came (HttpInbound.headersUp, HttpOutbound.decide
  // for a rule without filters): HTTP/1.1, no upgrade, one Host (`*host`), a Connection field that
  // names no other field (JS's forwardable() would drop that one too).
  static bool MayGoAsItCame(const Client* c, const std::string** host) {
    if (c->req.minor != 1 || c->req.upgrade || c->req.method == "CONNECT") return false;
    *host = nullptr;
    for (const auto& [n, v] : c->req.headers) {
      if (IEquals(n, "host")) {
        if (*host) return false;
        *host = &v;
      } else if (IEquals(n, "connection")) {
        if (AnyToken(v, [](const std::string& t) { return !t.empty() && !IEquals(t, "close") && !IEquals(t, "keep-alive"); })) return false;
      }
    }
    return *host != nullptr;
  }

  // The request goes out on `u` as it came (the engine's own decision, reported in delivered()):
  // hop-by-hop fields out, chunked framing kept, its id (added as its head was read, if missing).
  // `reused`: an idle connection of its pool.
  void SendAsItCame(Client* c, Upstream* u, bool reused) {
    std::string head;
    head.reserve(c->req.length + 64);
    head.append(c->req.method).append(" ").append(c->req.target).append(" HTTP/1.1\r\n");
    for (const auto& [n, v] : c->req.headers) {
      if (HopByHop(n) || IEquals(n, "transfer-encoding")) continue;
      head.append(n).append(": ").append(v).append("\r\n");
    }
    if (c->req.chunked) head.append("transfer-encoding: chunked\r\n");
    head.append("\r\n");
    c->answerRemove.clear();
    c->answerAdd.clear();
    Link(c, u, false, reused, c->routed ? c->routed->targets[c->target].maxRequests : 0);
    c->retryable = false;
    c->retryOn.clear();
    c->keepBody = false;
    c->replay.clear();
    c->resend = false;
    c->unread = true;
    Send(c, head);
  }

  // A request on a `direct` connection, sent here when JS would only have passed it on as it came,
  // on an idle connection of the pool: false when it is JS's to decide (no gate, or one that does
  // not pass it; a target admission would change; see MayGoAsItCame; no idle connection).
  bool ForwardDirect(Client* c) {
    const std::string* host = nullptr;
    if (c->direct.empty() || !PlainTarget(c->req.target) || !MayGoAsItCame(c, &host)) return false;
    std::string_view target(c->req.target);
    if (!c->gate.PassesRequest(c->req.method, *host, target.substr(0, target.find('?')))) return false;
    Upstream* u = TakeIdle(c->direct);
    if (!u) return false;
    c->startedNs = uv_hrtime();
    depth_++;
    SendAsItCame(c, u, true);
    depth_--;
    return true;
  }

  // A request on a connection with routes (route()), routed here when JS would have sent it on as
  // it came to the endpoint the routes pick: false when it is JS's to decide (no routes, or they
  // ran out; a rule the engine does not read or act on, or none matched; see MayGoAsItCame). An
  // endpoint whose pool has no idle connection gets one JS dials for the request (a dial() event:
  // attach() sends it, dialFailed() makes it JS's), so that the split stays the engine's.
  bool ForwardRouted(Client* c) {
    Routes* routes = c->routes.get();
    const std::string* host = nullptr;
    if (!routes || c->req.target.empty() || c->req.target[0] != '/' || !MayGoAsItCame(c, &host)) return false;
    if (NowMs() >= routes->untilMs) {
      c->routes.reset();
      return false;
    }
    uint32_t t = 0, e = 0;
    auto field = [c](std::string_view name, std::string_view* value) {
      FieldCount n = FieldCount::kAbsent;
      for (const auto& [fn, fv] : c->req.headers) {
        if (!IEqualsLower(fn, name)) continue;
        n = n == FieldCount::kAbsent ? FieldCount::kOnce : FieldCount::kMany;
        *value = fv;
      }
      return n;
    };
    if (!routes->Route(c->req.method, c->req.target, field, &t, &e)) return false;
    c->routed = c->routes;
    c->target = t;
    c->endpoint = e;
    c->unread = true;
    c->startedNs = uv_hrtime();
    const std::string& pool = routes->targets[t].pools[e];
    depth_++;
    if (Upstream* u = TakeIdle(pool)) {
      SendAsItCame(c, u, true);
    } else {
      c->waitingPool = pool;
      Call(dial_, {Napi::Number::New(env_, static_cast<double>(c->id)), c->routed->record.Value(), Napi::Number::New(env_, t), Napi::Number::New(env_, e)});
    }
    depth_--;
    return true;
  }

  // A request the engine sent on (or was to) is JS's to decide after all: a head() event.
  void GiveBack(Client* c) {
    Unroute(c);
    c->unread = false;
    c->waitingPool.clear();
    AskJs(c);
  }

  // A routed request is no longer in flight as the engine's (it ended, or went to JS).
  static void Unroute(Client* c) {
    if (!c->routed) return;
    c->routed->Done(c->target);
    c->routed.reset();
  }

  // respond(id, bytes, close, status): the proxy's own answer to the request waiting for a
  // decision; done() follows once the request's body (if any) was read and dropped.
  Napi::Value Respond(const Napi::CallbackInfo& info) {
    Client* c = Find(info[0]);
    if (!c || c->phase != Client::Phase::kDecide) return info.Env().Undefined();
    if (info[1].IsBuffer()) {
      auto b = info[1].As<Napi::Buffer<char>>();
      c->peer.out.append(b.Data(), b.Length());
    } else {
      c->peer.out.append(Latin1(info[1]));
    }
    c->peer.in.erase(0, c->req.length);
    // An upgrade answered by the proxy: what follows its head may be the new protocol's, not a request.
    if (info[2].ToBoolean().Value() || c->req.upgrade) c->closeAfter = true;
    depth_++;
    AnswerWith(c, info[3].As<Napi::Number>().Int32Value());
    depth_--;
    return info.Env().Undefined();
  }

  // expire(id, bytes, status): the request's time ran out (a route's timeouts.request). If
  // nothing of its answer went to the client yet, its upstream goes and `bytes` answer it (done()
  // follows as for respond): 0. If the answer was under way: its status, and nothing is done here
  // (the caller resets the connection). -1 when no request is in flight.
  Napi::Value Expire(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Client* c = Find(info[0]);
    if (!c || c->answered || (c->phase != Client::Phase::kDecide && c->phase != Client::Phase::kExchange)) return Napi::Number::New(env, -1);
    if (c->up && c->up->headDone) return Napi::Number::New(env, c->status);
    depth_++;
    if (c->phase == Client::Phase::kDecide) c->peer.in.erase(0, c->req.length);
    if (c->up) DetachUpstream(c, false);
    auto b = info[1].As<Napi::Buffer<char>>();
    c->peer.out.append(b.Data(), b.Length());
    AnswerWith(c, info[2].As<Napi::Number>().Int32Value());
    depth_--;
    return Napi::Number::New(env, 0);
  }

  // abandon(id): the attempt in flight is given up before its answer came (a per-try timeout):
  // its upstream goes and the request waits for forward() again: 1. 0 when there is no such
  // attempt (its answer is under way, or none is in flight); -1 when it cannot be sent again (its
  // body is not whole yet, or was not kept): nothing is done (the caller expires the request).
  Napi::Value Abandon(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Client* c = Find(info[0]);
    if (!c || c->phase != Client::Phase::kExchange || c->answered || !c->up || c->up->headDone) return Napi::Number::New(env, 0);
    if (!Replayable(c)) return Napi::Number::New(env, -1);
    depth_++;
    Requeue(c);
    depth_--;
    return Napi::Number::New(env, 1);
  }

  // keptBody(id): the body of the request in flight as it was sent (its framing included; empty
  // for a request without one), once it was read whole and kept (forward's `keep`, or a retry);
  // undefined otherwise (over 64 KiB, not kept, or not whole yet). Valid until the next request.
  Napi::Value KeptBody(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Client* c = Find(info[0]);
    if (!c || !Replayable(c)) return env.Undefined();
    return Napi::Buffer<char>::Copy(env, c->replay.data(), c->body.kind == BodyKind::kNone ? 0 : c->replay.size());
  }

  // release(id): {fd, buffered}: the client connection back to JS, at a request's start (the
  // request's head and whatever followed it are `buffered`). Undefined if it is not there.
  Napi::Value Release(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    Client* c = Find(info[0]);
    if (!c || c->phase != Client::Phase::kDecide || !c->peer.out.empty() || !c->waitingPool.empty()) return env.Undefined();
    // Its earlier requests' reports go first: JS takes the connection from here on.
    if (!reports_.empty()) FlushReports();
    Napi::Object out = Napi::Object::New(env);
    out.Set("buffered", Napi::Buffer<char>::Copy(env, c->peer.in.data(), c->peer.in.size()));
    // The bytes the engine itself read from the socket (node:net counts what it reads) and wrote.
    out.Set("read", Napi::Number::New(env, static_cast<double>(c->peer.read)));
    out.Set("written", Napi::Number::New(env, static_cast<double>(c->peer.written)));
    if (c->peer.ch) {
      int fd = Bridge(c);
      if (fd < 0) return env.Undefined();
      out.Set("fd", Napi::Number::New(env, fd));
      out.Set("bridged", Napi::Boolean::New(env, true));
      return out;
    }
    out.Set("fd", Napi::Number::New(env, c->peer.fd));
    c->peer.fd = -1;  // JS's now
    Drop(&c->peer);
    Bury(c);
    return out;
  }

  // A client on a channel has no socket to give JS: the bytes after its buffered ones pass to a
  // socket pair's end (as an upgrade's tunnel) and JS gets the other end. -1 without one (EMFILE).
  int Bridge(Client* c) {
    int sv[2];
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv) != 0) return -1;
    auto made = std::make_unique<Upstream>();
    Upstream* u = made.get();
    if (!Open(&u->peer, sv[0], false)) {
      close(sv[0]);
      close(sv[1]);
      return -1;
    }
    u->peer.upstream = u;
    u->client = c;
    u->headDone = true;
    upstreams_[u] = std::move(made);
    c->peer.in.clear();
    c->up = u;
    c->bridge = true;
    c->phase = Client::Phase::kTunnel;
    depth_++;
    PumpTunnel(c);
    depth_--;
    return sv[1];
  }

  Napi::Value CloseJs(const Napi::CallbackInfo& info) {
    Client* c = Find(info[0]);
    if (c) {
      depth_++;
      CloseClient(c, "closed by the proxy", true);
      depth_--;
    }
    return info.Env().Undefined();
  }

  // dropPools(prefix): closes the idle upstream connections of pools whose key starts with it.
  Napi::Value DropPools(const Napi::CallbackInfo& info) {
    std::string prefix = info[0].As<Napi::String>().Utf8Value();
    for (auto it = idle_.begin(); it != idle_.end();) {
      if (it->first.compare(0, prefix.size(), prefix) != 0) {
        ++it;
        continue;
      }
      for (Upstream* u : it->second) CloseUpstream(u);
      it = idle_.erase(it);
    }
    return info.Env().Undefined();
  }

  Napi::Value Stats(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    size_t idle = 0;
    for (auto& [k, v] : idle_) idle += v.size();
    Napi::Object o = Napi::Object::New(env);
    o.Set("clients", Napi::Number::New(env, static_cast<double>(clients_.size())));
    o.Set("upstreams", Napi::Number::New(env, static_cast<double>(upstreams_.size())));
    o.Set("idle", Napi::Number::New(env, static_cast<double>(idle)));
    return o;
  }

  Napi::Value Destroy(const Napi::CallbackInfo& info) {
    Shutdown();
    return info.Env().Undefined();
  }

  // -- sockets ---------------------------------------------------------------------------------

  bool Open(Peer* p, int fd, bool isClient) {
    p->engine = this;
    p->fd = fd;
    p->isClient = isClient;
    p->poll = new uv_poll_t;
    if (uv_poll_init(loop_, p->poll, fd) != 0) {
      delete p->poll;
      p->poll = nullptr;
      errno = EBADF;
      return false;
    }
    p->poll->data = p;
    // Heads and bodies go as they are ready: Nagle's algorithm would hold a small answer for the
    // peer's delayed ACK. (Not a TCP socket, such as a socket pair's end: nothing to set.)
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return true;
  }

  void OpenChannel(Peer* p, std::shared_ptr<Channel> ch, bool isClient) {
    p->engine = this;
    p->isClient = isClient;
    p->ch = std::move(ch);
    p->ch->Bind(0, p);
  }

  // Stops polling the socket and closes it (unless it was handed back to JS: fd -1); a channel is
  // closed (its stream reset if bytes for it were left unread, as a socket's peer would be).
  void Drop(Peer* p) {
    if (p->closed) return;
    p->closed = true;
    if (p->ch) {
      p->ch->Close(0, false);
      p->ch.reset();
      return;
    }
    ClosePolled(p->poll, p->fd);
  }

  // No more bytes from this side (a FIN).
  void ShutWrite(Peer* p) {
    if (p->ch) p->ch->Shut(0);
    else shutdown(p->fd, SHUT_WR);
  }

  // The events the socket waits for, from what its connection needs now.
  void Arm(Peer* p) {
    if (p->closed) return;
    int want = p->out.empty() ? 0 : UV_WRITABLE;
    if (!p->eof && WantsRead(p)) want |= UV_READABLE;
    if (p->ch) {
      // A channel tells of changes only: what is ready already is looked at on the next turn.
      p->events = want;
      const Channel& ch = *p->ch;
      bool readable = !ch.Inbox(0).empty() || ch.AtEnd(0) || ch.WasReset(0);
      if (((want & UV_READABLE) && readable) || ((want & UV_WRITABLE) && (ch.Room(0) > 0 || ch.PeerClosed(0)))) p->ch->Poke(0);
      return;
    }
    if (want == p->events) return;
    p->events = want;
    if (want == 0) uv_poll_stop(p->poll);
    else uv_poll_start(p->poll, want, OnPoll);
  }

  bool WantsRead(Peer* p) {
    if (p->isClient) {
      Client* c = ClientOf(p);
      switch (c->phase) {
        case Client::Phase::kHead:
        case Client::Phase::kDecide:
          return p->in.size() < maxHead_ + kReadChunk;
        case Client::Phase::kExchange:
          if (!c->body.done) return c->up ? c->up->peer.out.size() < kHighWater : p->in.size() < kReadChunk;
          return p->in.size() < kReadChunk;
        case Client::Phase::kTunnel:
          return c->up && c->up->peer.out.size() < kHighWater;
        case Client::Phase::kClosing:
          return false;
      }
      return false;
    }
    Upstream* u = UpstreamOf(p);
    return u->client == nullptr || u->client->peer.out.size() < kHighWater;
  }

  static Client* ClientOf(Peer* p) { return p->client; }
  static Upstream* UpstreamOf(Peer* p) { return p->upstream; }

  // Writes what it can; false on an error (the peer is gone).
  bool Flush(Peer* p) {
    if (p->ch) {
      if (p->closed || p->out.empty()) return true;
      if (p->ch->PeerClosed(0)) return errno = p->ch->WasReset(0) ? ECONNRESET : EPIPE, false;
      size_t n = std::min(p->out.size(), p->ch->Room(0));
      if (n == 0) return true;
      p->ch->Write(0, p->out.data(), n);
      p->written += n;
      p->out.erase(0, n);
      return true;
    }
    while (!p->out.empty() && !p->closed) {
      ssize_t n = send(p->fd, p->out.data(), p->out.size(), MSG_NOSIGNAL);
      if (n > 0) {
        p->written += static_cast<uint64_t>(n);
        p->out.erase(0, static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
      return false;
    }
    return true;
  }

  // Reads what is there (up to a bound); false on an error. EOF sets `eof`.
  bool Fill(Peer* p) {
    if (p->ch) {
      if (p->eof) return true;
      Channel& ch = *p->ch;
      if (ch.WasReset(0)) return errno = ECONNRESET, false;
      const std::string& in = ch.Inbox(0);
      size_t n = std::min(in.size(), 4 * kReadChunk);
      p->in.append(in.data(), n);
      p->read += n;
      ch.Consumed(0, n);
      if (ch.AtEnd(0)) p->eof = true;
      return true;
    }
    static char buf[kReadChunk];
    for (int rounds = 0; rounds < 4 && !p->eof; rounds++) {
      ssize_t n = recv(p->fd, buf, sizeof buf, 0);
      if (n > 0) {
        p->read += static_cast<uint64_t>(n);
        p->in.append(buf, static_cast<size_t>(n));
        if (static_cast<size_t>(n) < sizeof buf) return true;
        continue;
      }
      if (n == 0) {
        p->eof = true;
        return true;
      }
      if (errno == EINTR) continue;
      return errno == EAGAIN || errno == EWOULDBLOCK;
    }
    return true;
  }

  static void OnPoll(uv_poll_t* h, int status, int events) { OnEvents(static_cast<Peer*>(h->data), status, events); }

 public:
  // A channel's notice: as a poll's, for the events its peer waits for.
  static void OnChannel(Peer* p) {
    if (p->events != 0) OnEvents(p, 0, p->events);
  }

 private:
  static void OnEvents(Peer* p, int status, int events) {
    Http1Engine* e = p->engine;
    Napi::HandleScope scope(e->env_);
    e->depth_++;
    e->Ready(p, status, events);
    e->depth_--;
    if (e->depth_ == 0) e->graveyard_.clear();
  }

  void Ready(Peer* p, int status, int events) {
    if (p->closed) return;
    if (p->isClient) {
      Client* c = ClientOf(p);
      bool ok = status >= 0;
      if (ok && (events & UV_WRITABLE)) ok = Flush(p);
      if (ok && (events & UV_READABLE) && WantsRead(p)) ok = Fill(p);
      if (!ok) return CloseClient(c, std::string("client socket: ") + strerror(errno), true);
      c->lastActive = NowMs();
      Upstream* u = c->up;
      AdvanceClient(c);
      // The client took what was queued for it: its upstream may be read again.
      if (u && u->client == c && !c->peer.closed) Arm(&u->peer);
    } else {
      Upstream* u = UpstreamOf(p);
      if (u->client) u->client->lastActive = NowMs();
      bool ok = status >= 0;
      if (ok && (events & UV_WRITABLE)) ok = Flush(p);
      if (ok && (events & UV_READABLE)) ok = Fill(p);
      if (!ok) p->eof = true;  // an error reads as the end: the answer is cut if it was not whole
      if (!u->client) {
        // Idle in its pool: anything it sends, or its close, ends it.
        if (p->eof || !p->in.empty()) RemoveIdle(u), CloseUpstream(u);
        return;
      }
      Client* c = u->client;
      AdvanceAnswer(u);
      // The upstream took what was queued for it: its client may be read again.
      if (c->up == u && !c->peer.closed) Arm(&c->peer);
    }
  }

  // -- the client's side -------------------------------------------------------------------------

  void AdvanceClient(Client* c) {
    Peer* p = &c->peer;
    if (p->closed) return;
    switch (c->phase) {
      case Client::Phase::kHead: {
        if (!p->out.empty()) break;  // the last answer goes out first
        if (p->in.empty()) {
          if (p->eof) return CloseClient(c, "", false);
          break;
        }
        Head h;
        std::string why;
        Parsed r = ParseHead(p->in, true, maxHead_, &h, &why);
        if (r == Parsed::kMore) {
          if (p->eof) return CloseClient(c, "the client closed within a request's head", false);
          if (c->headSince == 0) c->headSince = NowMs();
          break;
        }
        c->headSince = 0;
        if (r == Parsed::kTooLarge) return Refuse(c, 431, "HPE_HEADER_OVERFLOW: request head over the limit");
        if (r == Parsed::kBad) return Refuse(c, 400, why);
        c->req = std::move(h);
        c->body.Start(c->req.chunked ? BodyKind::kChunked : c->req.contentLength != kNoLength ? BodyKind::kLength : BodyKind::kNone, c->req.contentLength == kNoLength ? 0 : c->req.contentLength);
        c->phase = Client::Phase::kDecide;
        c->upgrading = false;
        c->idleRetried = false;
        c->resend = false;
        c->keepBody = false;
        c->replay.clear();
        c->answered = false;
        c->bytesOut = 0;
        c->status = 0;
        c->closeAfter = c->req.close;
        c->headRequest = c->req.method == "HEAD";
        c->unread = false;
        // A request without an id gets one here (as it goes on, as JS sees it).
        if (std::none_of(c->req.headers.begin(), c->req.headers.end(), [](const auto& f) { return IEquals(f.first, "x-request-id"); })) {
          char id[36];
          NewRequestId(id);
          c->req.headers.emplace_back("x-request-id", std::string(id, sizeof(id)));
        }
        Arm(p);
        if (!ForwardDirect(c) && !ForwardRouted(c)) AskJs(c);
        return;
      }
      case Client::Phase::kExchange:
        if (!c->body.done) return PumpRequest(c);
        // Bytes after a whole request are the next request's: read once this one is answered.
        // A client that closed its side still gets its answer, then the connection ends.
        if (p->eof) c->closeAfter = true;
        break;
      case Client::Phase::kTunnel:
        return PumpTunnel(c);
      case Client::Phase::kDecide:
      case Client::Phase::kClosing:
        break;
    }
    if (c->phase == Client::Phase::kClosing && p->out.empty()) return CloseClient(c, "", false);
    Arm(p);
  }

  void AskJs(Client* c) {
    Napi::Env env = env_;
    Napi::Array headers = Napi::Array::New(env, c->req.headers.size() * 2);
    uint32_t i = 0;
    for (auto& [n, v] : c->req.headers) {
      headers.Set(i++, NewLatin1(env, n));
      headers.Set(i++, NewLatin1(env, v));
    }
    int body = c->req.chunked ? 2 : c->req.contentLength != kNoLength && c->req.contentLength > 0 ? 1 : 0;
    uint64_t id = c->id;
    Call(head_, {Napi::Number::New(env, static_cast<double>(id)), Napi::String::New(env, c->req.method), NewLatin1(env, c->req.target),
                 Napi::Number::New(env, c->req.minor), headers, Napi::Number::New(env, body), Napi::Boolean::New(env, c->req.upgrade)});
  }

  // The request's body, as it comes, to its upstream (or nowhere once it was answered).
  void PumpRequest(Client* c) {
    Peer* p = &c->peer;
    Upstream* u = c->up;
    if (!c->body.done) {
      std::string* out = u && !u->peer.closed ? &u->peer.out : nullptr;
      size_t before = out ? out->size() : 0;
      bool pumped = c->body.Pump(&p->in, out, p->eof);
      if (c->keepBody) {
        if (out) c->replay.append(*out, before, std::string::npos);
        // Too large to keep, or dropped (nobody to send it to): no retry sends it again.
        if (!out || c->replay.size() > kReplayLimit) {
          c->keepBody = false;
          std::string().swap(c->replay);
        }
      }
      if (!pumped) {
        if (u) DetachUpstream(c, false);
        return Refuse(c, 400, "HPE_INVALID_CHUNK_SIZE: malformed chunked body");
      }
      if (!c->body.done && p->eof) {
        // The client ended within its body: nothing whole can come of it.
        if (u) DetachUpstream(c, false);
        return CloseClient(c, "the client closed within a request's body", true);
      }
    }
    if (u && !u->peer.closed) {
      if (!Flush(&u->peer)) {
        u->peer.eof = true;
        return AdvanceAnswer(u);
      }
      Arm(&u->peer);
    }
    if (c->answered && c->body.done) return Finish(c, c->reportAtEnd);
    Arm(p);
  }

  // The answer is whole (and the request too, or the connection ends): the next request, or the end.
  void Finish(Client* c, bool report) {
    if (!c->body.done) c->closeAfter = true;
    c->reportAtEnd = false;
    if (report) ReportDone(c, c->status, "-", "");
    if (c->peer.closed) return;
    c->phase = c->closeAfter ? Client::Phase::kClosing : Client::Phase::kHead;
    if (!FlushClient(c)) return;
    AdvanceClient(c);
  }

  // Writes what is queued for the client; on an error the connection is reset: false.
  bool FlushClient(Client* c) {
    if (Flush(&c->peer)) return true;
    CloseClient(c, std::string("client socket: ") + strerror(errno), true);
    return false;
  }

  // The proxy's own answer (queued in the client's out already) ends the request: reported with
  // `status` once the request's body, if any, was read and dropped (as it comes), before the next
  // request.
  void AnswerWith(Client* c, int status) {
    c->phase = Client::Phase::kExchange;
    c->answered = true;
    c->status = status;
    c->reportAtEnd = true;
    if (FlushClient(c)) PumpRequest(c);
  }

  // Whether the request in flight can be sent again: it has no body, or its body was read whole
  // and kept (a route's retry, under kReplayLimit).
  static bool Replayable(const Client* c) { return c->body.kind == BodyKind::kNone || (c->keepBody && c->body.done); }

  // The request waits for forward() again, as it came (its head, and its body as kept, back in
  // front of what was read): its upstream goes.
  void Requeue(Client* c) {
    DetachUpstream(c, false);
    if (c->body.kind != BodyKind::kNone) {
      c->peer.in.insert(0, c->replay);
      c->replay.clear();
      c->body.Start(c->body.kind, c->req.contentLength == kNoLength ? 0 : c->req.contentLength);
    }
    c->peer.in.insert(0, c->rawHead);
    c->resend = true;
    c->phase = Client::Phase::kDecide;
    Arm(&c->peer);
  }

  // A whole message of the proxy's: a text body, closing the connection after it when `close`.
  static std::string ProxyMessage(int status, const char* reason, const std::string& detail, bool close) {
    std::string body = detail + "\n";
    return "HTTP/1.1 " + std::to_string(status) + " " + reason + "\r\ncontent-type: text/plain\r\ncontent-length: " + std::to_string(body.size()) + "\r\n" + (close ? "connection: close\r\n" : "") + "\r\n" + body;
  }

  // The proxy's answer to a request it cannot read; the connection ends after it. `why` is
  // "CODE: text" (llhttp's error codes, as node:http reports them): JS counts the code, the
  // client reads the text.
  void Refuse(Client* c, int status, const std::string& why) {
    size_t colon = why.find(": ");
    c->peer.out += ProxyMessage(status, status == 431 ? "Request Header Fields Too Large" : status == 408 ? "Request Timeout" : "Bad Request", colon == std::string::npos ? why : why.substr(colon + 2), true);
    c->phase = Client::Phase::kClosing;
    c->peer.in.clear();
    ReportDone(c, status, "DPE", why);
    if (c->peer.closed) return;
    if (!Flush(&c->peer)) return CloseClient(c, "", true);
    AdvanceClient(c);
  }

  void CloseClient(Client* c, const std::string& reason, bool abortive) {
    if (c->peer.closed) return;
    // A tunnel that ends by an error or the proxy: still the upgrade that was made (101).
    if (c->phase == Client::Phase::kTunnel) {
      c->phase = Client::Phase::kClosing;
      ReportDone(c, 101, "-", reason);
      if (c->peer.closed) return;
    }
    // A request the engine passed on unread, in flight: JS would have counted it (left()).
    if (c->unread) ReportDone(c, 0, "DC", reason);
    c->waitingPool.clear();
    if (c->up) DetachUpstream(c, false);
    if (abortive && c->peer.fd >= 0) {
      struct linger l = {1, 0};
      setsockopt(c->peer.fd, SOL_SOCKET, SO_LINGER, &l, sizeof l);
    }
    if (abortive && c->peer.ch) c->peer.ch->Close(0, true);  // the stream is reset
    Drop(&c->peer);
    uint64_t id = c->id;
    double read = static_cast<double>(c->peer.read), written = static_cast<double>(c->peer.written);
    bool bridge = c->bridge;
    Bury(c);
    if (!reports_.empty()) FlushReports();
    if (!bridge) Call(closed_, {Napi::Number::New(env_, static_cast<double>(id)), Napi::String::New(env_, reason), Napi::Number::New(env_, read), Napi::Number::New(env_, written)});
  }

  // -- the upstream's side -----------------------------------------------------------------------

  void AdvanceAnswer(Upstream* u) {
    Client* c = u->client;
    Peer* p = &u->peer;
    if (c->phase == Client::Phase::kTunnel) return PumpTunnel(c);
    while (!u->headDone) {
      std::string why;
      Head h;
      Parsed r = ParseHead(p->in, false, maxHead_ * 4, &h, &why);
      if (r == Parsed::kMore && !p->eof) return Arm(p);
      if (r == Parsed::kDone && h.status == 101 && c->upgrading) return StartTunnel(c, u, h);
      if (r != Parsed::kDone || h.status == 101) {
        bool none = r == Parsed::kMore;
        // A reused idle connection its server closed just as the request went (the keep-alive
        // race): a request without a body is sent again once, on another connection JS gives
        // (forward() again), as node:http's documentation advises. Nothing reached the client.
        // A route's retry does the same for any request without a body, when JS says so.
        if (none && p->in.empty() && Replayable(c) && (c->retryable || (u->reused && !c->idleRetried && c->body.kind == BodyKind::kNone))) {
          c->idleRetried = true;
          Requeue(c);
          // JS decides it now, as any request it was asked about.
          if (c->unread) return GiveBack(c);
          if (Call(retry_, {Napi::Number::New(env_, static_cast<double>(c->id)), Napi::Number::New(env_, 0)})) return;
          // JS will not send it again: the proxy answers, as below.
          if (c->peer.closed || c->phase != Client::Phase::kDecide) return;
          c->peer.in.erase(0, c->req.length);
          c->phase = Client::Phase::kExchange;
          return Answer(c, 503, "UC", "upstream connect error or disconnect/reset before headers");
        }
        // Nothing of an answer, or not one we can pass on: the proxy answers (Envoy's UC / UPE).
        DetachUpstream(c, false);
        return Answer(c, none ? 503 : 502, none ? "UC" : "UPE", none ? "upstream connect error or disconnect/reset before headers" : "upstream sent a malformed answer: " + why);
      }
      bool interim = h.status < 200;
      // A route's retry on this code (a request without a body): JS says whether it goes again
      // (then this answer is dropped with its connection) or is passed on.
      if (!interim && c->retryable && Replayable(c) && std::find(c->retryOn.begin(), c->retryOn.end(), h.status) != c->retryOn.end()) {
        bool again = Call(retry_, {Napi::Number::New(env_, static_cast<double>(c->id)), Napi::Number::New(env_, h.status)});
        if (c->peer.closed || c->up != u) return;
        if (again) return Requeue(c);
      }
      p->in.erase(0, h.length);
      std::string head = "HTTP/1.1 " + std::to_string(h.status) + " " + h.reason + "\r\n";
      bool untilClose = !interim && !c->headRequest && h.status != 204 && h.status != 304 && !h.chunked && h.contentLength == kNoLength;
      // An upgrade refused: its answer, then the connection ends (what the client sent after
      // its head may be the new protocol's, which nobody can read now).
      if (untilClose || (c->upgrading && !interim)) c->closeAfter = true;
      std::vector<std::string> listed;
      for (auto& [n, v] : h.headers)
        if (IEquals(n, "connection")) AnyToken(v, [&listed](const std::string& t) {
            if (!t.empty()) listed.push_back(Lower(t));
            return false;
          });
      for (auto& [n, v] : h.headers) {
        if (HopByHop(n)) continue;
        std::string ln = Lower(n);
        // Both framings: chunked frames it (RFC 9112 6.3), and only that goes on.
        if (ln == "content-length" && h.chunked) continue;
        bool drop = !interim && AnswerRemoves(c, ln);
        for (auto& l : listed) drop = drop || l == ln;
        if (drop) continue;
        head += n;
        head += ": ";
        head += v;
        head += "\r\n";
      }
      if (!interim) {
        head += c->answerAdd;
        if (c->closeAfter) head += "connection: close\r\n";
      }
      head += "\r\n";
      c->peer.out += head;
      if (interim) continue;
      u->headDone = true;
      c->status = h.status;
      u->reusable = !h.close && !untilClose;
      u->body.Start(c->headRequest || h.status == 204 || h.status == 304 ? BodyKind::kNone : h.chunked ? BodyKind::kChunked : untilClose ? BodyKind::kUntilClose : BodyKind::kLength,
                    h.contentLength == kNoLength ? 0 : h.contentLength);
      u->answer = std::move(h);
    }
    if (!u->body.Pump(&p->in, &c->peer.out, p->eof)) {
      DetachUpstream(c, false);
      return Cut(c, "upstream sent a malformed chunked body");
    }
    c->bytesOut = u->body.bytes;
    if (!FlushClient(c)) return;
    if (!u->body.done) {
      if (p->eof) {
        DetachUpstream(c, false);
        return Cut(c, "upstream closed within the answer's body");
      }
      Arm(p);
      Arm(&c->peer);
      return;
    }
    // Bytes after a whole answer, or a request not sent whole: this connection is not reused;
    // nor after its last request (connectionPool.http.maxRequestsPerConnection).
    u->served++;
    bool spent = u->maxRequests != 0 && u->served >= u->maxRequests;
    DetachUpstream(c, u->reusable && !spent && p->in.empty() && !p->eof && c->body.done);
    c->answered = true;
    Finish(c, true);
  }

  // Whether the route's answer edits remove the field `lower` (a lower-case name).
  static bool AnswerRemoves(const Client* c, const std::string& lower) {
    for (auto& r : c->answerRemove)
      if (r == lower) return true;
    return false;
  }

  // A 101 to an upgrade: its head goes to the client as it came (its Connection and Upgrade
  // fields are the switch), the route's answer edits applied; then the two connections are joined.
  void StartTunnel(Client* c, Upstream* u, const Head& h) {
    std::string head = "HTTP/1.1 101 " + h.reason + "\r\n";
    for (auto& [n, v] : h.headers) {
      if (AnswerRemoves(c, Lower(n))) continue;
      head += n + ": " + v + "\r\n";
    }
    head += c->answerAdd;
    head += "\r\n";
    u->peer.in.erase(0, h.length);
    u->headDone = true;
    c->status = 101;
    c->phase = Client::Phase::kTunnel;
    c->peer.out += head;
    PumpTunnel(c);
  }

  // A tunnel's bytes both ways, as they are; an end of one side is passed on (shutdown) once what
  // it sent went; when both ended, the exchange is done (101) and the connection closes.
  void PumpTunnel(Client* c) {
    Upstream* u = c->up;
    if (!u) return CloseClient(c, "", false);
    Peer* cp = &c->peer;
    Peer* up = &u->peer;
    c->body.bytes += cp->in.size();
    up->out += cp->in;
    cp->in.clear();
    c->bytesOut += up->in.size();
    cp->out += up->in;
    up->in.clear();
    if (!Flush(up)) up->eof = true, up->out.clear();
    if (!Flush(cp)) return EndTunnel(c, true);
    if (cp->eof && up->out.empty() && !c->clientDone) {
      c->clientDone = true;
      ShutWrite(up);
    }
    if (up->eof && cp->out.empty() && !c->upstreamDone) {
      c->upstreamDone = true;
      ShutWrite(cp);
    }
    if (c->clientDone && c->upstreamDone) return EndTunnel(c, false);
    Arm(up);
    Arm(cp);
  }

  void EndTunnel(Client* c, bool abortive) {
    c->phase = Client::Phase::kClosing;
    ReportDone(c, 101, "-", "");
    CloseClient(c, "", abortive);
  }

  // The proxy's answer in place of the upstream's (nothing of it was passed on yet).
  void Answer(Client* c, int status, const char* flag, const std::string& detail) {
    c->peer.out += ProxyMessage(status, status == 503 ? "Service Unavailable" : "Bad Gateway", detail, c->closeAfter || !c->body.done);
    c->status = status;
    c->answered = true;
    ReportDone(c, status, flag, detail);
    if (c->peer.closed) return;
    Finish(c, false);
  }

  // An answer cut short after its head went to the client: the client's connection is reset, so
  // it cannot take what it got for a whole answer.
  void Cut(Client* c, const std::string& why) {
    ReportDone(c, c->status, "UPE", why);
    CloseClient(c, why, true);
  }

  // Ends the client's use of its upstream: back to its pool, or closed.
  void DetachUpstream(Client* c, bool reuse) {
    Upstream* u = c->up;
    if (!u) return;
    c->up = nullptr;
    u->client = nullptr;
    if (!reuse || u->peer.closed || maxIdlePerPool_ == 0) return CloseUpstream(u);
    auto& list = idle_[u->pool];
    if (list.size() >= maxIdlePerPool_) return CloseUpstream(u);
    u->idleSince = NowMs();
    u->body = Framing();
    list.push_back(u);
    Arm(&u->peer);
  }

  Upstream* TakeIdle(const std::string& pool) {
    auto it = idle_.find(pool);
    if (it == idle_.end()) return nullptr;
    while (!it->second.empty()) {
      Upstream* u = it->second.back();
      it->second.pop_back();
      if (!u->peer.closed && !u->peer.eof) {
        if (it->second.empty()) idle_.erase(it);
        return u;
      }
      CloseUpstream(u);
    }
    idle_.erase(it);
    return nullptr;
  }

  void RemoveIdle(Upstream* u) {
    auto it = idle_.find(u->pool);
    if (it == idle_.end()) return;
    auto& list = it->second;
    for (size_t i = 0; i < list.size(); i++)
      if (list[i] == u) {
        list.erase(list.begin() + static_cast<long>(i));
        break;
      }
    if (list.empty()) idle_.erase(it);
  }

  void CloseUpstream(Upstream* u) {
    Drop(&u->peer);
    auto it = upstreams_.find(u);
    if (it == upstreams_.end()) return;
    graveyard_.push_back(std::move(it->second));
    upstreams_.erase(it);
  }

  // -- bookkeeping -------------------------------------------------------------------------------

  Client* Find(const Napi::Value& v) {
    auto it = clients_.find(static_cast<uint64_t>(v.As<Napi::Number>().Int64Value()));
    return it == clients_.end() || it->second->peer.closed ? nullptr : it->second.get();
  }

  // Deleted once no call on the stack can still hold it.
  void Bury(Client* c) {
    auto it = clients_.find(c->id);
    if (it == clients_.end()) return;
    graveyard_.push_back(std::move(it->second));
    clients_.erase(it);
    if (depth_ == 0) graveyard_.clear();
  }

  void ReportDone(Client* c, int status, const char* flag, const std::string& detail) {
    if (c->bridge) return;
    Napi::Env env = env_;
    if (c->unread) {
      c->unread = false;
      // Told on the loop's next turn (see FlushReports): its answer goes on first.
      reports_.push_back({c->id, status, flag, c->body.bytes, c->bytesOut, static_cast<double>(uv_hrtime() - c->startedNs) / 1e6, c->routed, c->target, c->endpoint});
      Unroute(c);
      if (reports_.size() == 1) uv_idle_start(reportIdle_, [](uv_idle_t* h) { static_cast<Http1Engine*>(h->data)->FlushReports(); });
      return;
    }
    Call(done_, {Napi::Number::New(env, static_cast<double>(c->id)), Napi::Number::New(env, status), Napi::String::New(env, flag),
                 Napi::Number::New(env, static_cast<double>(c->body.bytes)), Napi::Number::New(env, static_cast<double>(c->bytesOut)), Napi::String::New(env, detail)});
  }

  // Calls into JS; true when it returned true (what retry() answers).
  bool Call(Napi::FunctionReference& f, const std::initializer_list<napi_value>& args) {
    if (shutdown_) return false;
    Napi::HandleScope scope(env_);
    try {
      Napi::Value v = f.MakeCallback(Value(), args, ctx_);
      return v.IsBoolean() && v.As<Napi::Boolean>().Value();
    } catch (const Napi::Error& e) {
      napi_fatal_exception(env_, e.Value());
      return false;
    }
  }

  // The requests the engine sent on by itself that ended are told to JS (delivered()) on the loop's
  // turn after they ended, not as they end: an answer that went into a channel reaches its HBONE
  // stream only after the loop's I/O callbacks (uv_check), which JS's counting would delay; and one
  // turn's reports go together. A client connection's reports go before its closed().
  void FlushReports() {
    uv_idle_stop(reportIdle_);
    if (reports_.empty()) return;
    Napi::HandleScope scope(env_);
    std::vector<Report> now;
    now.swap(reports_);
    depth_++;
    for (const Report& r : now) {
      napi_value routed[3];
      RoutedArgs(env_, r.routes, r.target, r.endpoint, routed);
      Call(delivered_, {Napi::Number::New(env_, static_cast<double>(r.id)), Napi::Number::New(env_, r.status), Napi::String::New(env_, r.flag), Napi::Number::New(env_, static_cast<double>(r.bytesIn)),
                        Napi::Number::New(env_, static_cast<double>(r.bytesOut)), Napi::Number::New(env_, r.ms), routed[0], routed[1], routed[2]});
    }
    depth_--;
    if (depth_ == 0) graveyard_.clear();
  }

  // Once a second: keep-alive clients idle for idleMs, and pooled upstreams idle for poolIdleMs, close.
  void Sweep() {
    Napi::HandleScope scope(env_);
    uint64_t now = NowMs();
    depth_++;
    // Idle: nothing either way on either side for idleMs (between requests, or a stalled
    // exchange). Slow: a request head not whole within headTimeoutMs (node:http's headersTimeout).
    std::vector<Client*> idle, slow;
    for (auto& [id, c] : clients_) {
      if (c->phase == Client::Phase::kClosing) continue;
      if (static_cast<int64_t>(now - c->lastActive) >= idleMs_) idle.push_back(c.get());
      else if (c->phase == Client::Phase::kHead && c->headSince != 0 && static_cast<int64_t>(now - c->headSince) >= headMs_) slow.push_back(c.get());
    }
    for (Client* c : idle) CloseClient(c, "idle", false);
    for (Client* c : slow) {
      c->headSince = 0;
      Refuse(c, 408, "HPE_HEADERS_TIMEOUT: the request head did not come whole in time");
    }
    for (auto it = idle_.begin(); it != idle_.end();) {
      auto& list = it->second;
      for (size_t i = 0; i < list.size();) {
        if (static_cast<int64_t>(now - list[i]->idleSince) >= poolIdleMs_) {
          CloseUpstream(list[i]);
          list.erase(list.begin() + static_cast<long>(i));
        } else {
          i++;
        }
      }
      it = list.empty() ? idle_.erase(it) : std::next(it);
    }
    depth_--;
    if (depth_ == 0) graveyard_.clear();
  }

  void Shutdown() {
    if (shutdown_) return;
    shutdown_ = true;
    for (auto& [id, c] : clients_) Drop(&c->peer);
    for (auto& [u, owned] : upstreams_) Drop(&u->peer);
    idle_.clear();
    CloseHandle(timer_);
    CloseHandle(reportIdle_);
    if (depth_ == 0) {
      clients_.clear();
      upstreams_.clear();
      graveyard_.clear();
    }
  }

  Napi::Env env_;
  Napi::AsyncContext ctx_;
  Napi::FunctionReference head_, retry_, done_, delivered_, dial_, closed_;
  // What delivered() is to tell, on the loop's next turn (FlushReports).
  struct Report {
    uint64_t id;
    int status;
    const char* flag;  // a literal
    uint64_t bytesIn, bytesOut;
    double ms;
    std::shared_ptr<Routes> routes;
    uint32_t target, endpoint;
  };
  std::vector<Report> reports_;
  uv_idle_t* reportIdle_ = nullptr;
  RouteBook routeBook_;
  uv_loop_t* loop_ = nullptr;
  uv_timer_t* timer_ = nullptr;
  uint32_t maxHead_ = 16 * 1024;
  int64_t idleMs_ = 3600000;
  int64_t headMs_ = 60000;
  int64_t poolIdleMs_ = 4000;
  uint32_t maxIdlePerPool_ = 64;
  uint64_t nextId_ = 0;
  int depth_ = 0;
  bool shutdown_ = false;
  std::unordered_map<uint64_t, std::unique_ptr<Client>> clients_;
  std::unordered_map<Upstream*, std::unique_ptr<Upstream>> upstreams_;
  std::map<std::string, std::vector<Upstream*>> idle_;
  // Objects that ended while a call up the stack may still hold them.
  struct Grave {
    std::unique_ptr<Client> c;
    std::unique_ptr<Upstream> u;
    Grave(std::unique_ptr<Client> x) : c(std::move(x)) {}
    Grave(std::unique_ptr<Upstream> x) : u(std::move(x)) {}
  };
  std::vector<Grave> graveyard_;
};

void Peer::ChannelChanged() { Http1Engine::OnChannel(this); }

}  // namespace

Napi::Object InitHttp1(Napi::Env env, Napi::Object exports) {
  exports.Set("Http1Engine", Http1Engine::Define(env));
  return exports;
}

}  // namespace nodemesh
