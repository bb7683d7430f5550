// SPDX-License-Identifier: Apache-2.0
// HBONE's byte path in native code, on the JS thread's own libuv loop (its epoll set is one
// uv_poll there): TLS 1.3 (the OpenSSL that node carries and exports), HTTP/2 (the nghttp2 node
// carries and exports; Debian's headers), and the copy between each CONNECT stream and its
// application socket, or a channel to the HTTP/1.1 engine (channel.h). JS keeps every decision:
// which tunnel to dial and to whom, what identity the peer must have, whether a CONNECT may
// pass, and where a stream is delivered; the engine moves bytes and reports events. It shares
// the loop with the HTTP/1.1 engine (http1.cc) so that an L7 request crosses no thread and no
// socket pair (ARCHITECTURE.md, "One loop for HTTP and HBONE").
//
// Flow control is HTTP/2's own: a stream's DATA is acknowledged (WINDOW_UPDATE) only once it was
// written to the application, so a slow application holds at most a window per stream; bytes
// from the application are read while fewer than kAppBuffer wait for the stream's window.
// TLS runs over memory BIOs: one read() feeds every record that arrived, one write() sends every
// record produced.
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <arpa/inet.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include <nghttp2/nghttp2.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "channel.h"
#include "common.h"

namespace nodemesh {

namespace {

using Clock = std::chrono::steady_clock;

constexpr size_t kSocketRead = 256 * 1024;      // one read() of TLS records
constexpr size_t kAppRead = 64 * 1024;          // one read() from an application socket
constexpr size_t kAppBuffer = 512 * 1024;       // application bytes held per stream before reading stops
constexpr size_t kOutBatch = 64 * 1024;         // HTTP/2 output gathered before it is encrypted
constexpr size_t kEncryptedHigh = 1024 * 1024;  // encrypted bytes waiting for the socket before output stops
constexpr int32_t kStreamWindow = 4 * 1024 * 1024;
constexpr int32_t kConnectionWindow = 16 * 1024 * 1024;
constexpr uint32_t kMaxFrame = 1024 * 1024;
constexpr ssize_t kSendFrame = 256 * 1024;
constexpr uint32_t kServerMaxStreams = 200;
constexpr uint32_t kAppEvents = EPOLLIN | EPOLLRDHUP | EPOLLET;  // an application socket's, EPOLLOUT only while needed
constexpr uint32_t kMaxHeaderList = 64 * 1024;
constexpr int kHandshakeMs = 10000;
constexpr uint64_t kTimersMs = 200;  // handshake deadlines, pings, stream idle timeouts
const char* const kCiphers = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256";

std::string SslError(const char* what) {
  unsigned long e = ERR_get_error();
  std::string s = what;
  if (e != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    s += ": ";
    s += buf;
  }
  ERR_clear_error();
  return s;
}

// The first spiffe:// URI SAN of the peer's certificate ("" if none).
std::string PeerUri(SSL* ssl) {
  X509* cert = SSL_get0_peer_certificate(ssl);
  if (!cert) return "";
  auto* names = static_cast<GENERAL_NAMES*>(X509_get_ext_d2i(cert, NID_subject_alt_name, nullptr, nullptr));
  std::string uri;
  for (int i = 0; names && i < sk_GENERAL_NAME_num(names); i++) {
    const GENERAL_NAME* n = sk_GENERAL_NAME_value(names, i);
    if (n->type != GEN_URI) continue;
    const ASN1_IA5STRING* s = n->d.uniformResourceIdentifier;
    std::string v(reinterpret_cast<const char*>(ASN1_STRING_get0_data(s)), static_cast<size_t>(ASN1_STRING_length(s)));
    if (v.rfind("spiffe://", 0) == 0) {
      uri = v;
      break;
    }
  }
  if (names) GENERAL_NAMES_free(names);
  return uri;
}

std::string AddressOf(const sockaddr_storage& ss, int* port) {
  char buf[INET6_ADDRSTRLEN] = {0};
  if (ss.ss_family == AF_INET) {
    auto* a = reinterpret_cast<const sockaddr_in*>(&ss);
    inet_ntop(AF_INET, &a->sin_addr, buf, sizeof(buf));
    *port = ntohs(a->sin_port);
  } else {
    auto* a = reinterpret_cast<const sockaddr_in6*>(&ss);
    inet_ntop(AF_INET6, &a->sin6_addr, buf, sizeof(buf));
    *port = ntohs(a->sin6_port);
  }
  std::string s = buf;
  if (s.rfind("::ffff:", 0) == 0 && s.find('.') != std::string::npos) s = s.substr(7);
  return s;
}

int AlpnSelect(SSL*, const unsigned char** out, unsigned char* outlen, const unsigned char* in, unsigned int inlen, void*) {
  for (unsigned int i = 0; i < inlen;) {
    unsigned int len = in[i];
    if (i + 1 + len > inlen) break;
    if (len == 2 && memcmp(in + i + 1, "h2", 2) == 0) {
      *out = in + i + 1;
      *outlen = 2;
      return SSL_TLSEXT_ERR_OK;
    }
    i += 1 + len;
  }
  return SSL_TLSEXT_ERR_ALERT_FATAL;
}

// An event for JS: a type and string/number fields.
struct Event {
  std::string type;
  std::vector<std::pair<std::string, std::string>> strings;
  std::vector<std::pair<std::string, double>> numbers;
  Event& S(const char* k, std::string v) {
    strings.emplace_back(k, std::move(v));
    return *this;
  }
  Event& N(const char* k, double v) {
    numbers.emplace_back(k, v);
    return *this;
  }
};

// A byte buffer: data in [off, len), grown without zero-filling, compacted when it needs room.
class Buffer {
 public:
  size_t size() const { return len_ - off_; }
  bool empty() const { return len_ == off_; }
  const char* data() const { return p_.get() + off_; }
  void consume(size_t n) {
    off_ += n;
    if (off_ == len_) off_ = len_ = 0;
  }
  // Room for `want` more bytes at the end; commit() what was written there.
  char* space(size_t want) {
    if (off_ > 0 && len_ + want > cap_) {
      memmove(p_.get(), p_.get() + off_, len_ - off_);
      len_ -= off_;
      off_ = 0;
    }
    if (len_ + want > cap_) {
      size_t cap = std::max(cap_ * 2, len_ + want);
      std::unique_ptr<char[]> q(new char[cap]);
      if (len_ > 0) memcpy(q.get(), p_.get(), len_);
      p_ = std::move(q);
      cap_ = cap;
    }
    return p_.get() + len_;
  }
  void commit(size_t n) { len_ += n; }
  void append(const void* d, size_t n) {
    memcpy(space(n), d, n);
    commit(n);
  }
  void clear() { off_ = len_ = 0; }
  // Drops the storage too (a finished stream keeps nothing).
  void release() {
    clear();
    p_.reset();
    cap_ = 0;
  }

 private:
  std::unique_ptr<char[]> p_;
  size_t cap_ = 0, off_ = 0, len_ = 0;
};

struct Conn;

struct Stream final : ChannelEnd {
  uint64_t handle = 0;
  int32_t id = -1;
  Conn* conn = nullptr;
  // The application's side, once attached: a socket, or a channel to the HTTP/1.1 engine (side 1 here).
  int appFd = -1;
  std::shared_ptr<Channel> ch;
  bool Attached() const { return appFd >= 0 || ch != nullptr; }
  void ChannelChanged() override;
  uint64_t relay = 0;  // the attach's id, for its 'relayed' event
  int idleMs = 0;
  Clock::time_point last;
  // application -> peer
  Buffer fromApp;
  bool appEof = false;
  bool appPaused = false;  // readable, but the buffer is full
  bool deferred = false;   // nghttp2 waits for bytes (resume_data)
  // peer -> application
  Buffer toApp;
  bool peerEnd = false;
  bool appShut = false;
  // EPOLLOUT is asked for only while a write waits for room: a socket pair's end reports an
  // EPOLLOUT edge each time its peer reads, which would wake the loop for nothing.
  bool wantOut = false;
  uint64_t bytesFromApp = 0, bytesToApp = 0;
  // HTTP/2 state
  bool h2Closed = false;
  uint32_t rstCode = 0;
  bool finished = false;  // relay reported (or never attached and answered)
  bool answered = false;  // server: a response was submitted
  bool responded = false;  // client: the response headers came
  // request headers (server) and response status (client)
  std::string method, authority, forwarded, status;
  std::string error, reason;
  bool reset = false;
};

struct Conn {
  uint64_t id = 0;
  uint64_t server = 0;  // the listener it came from (0: a client tunnel)
  int fd = -1;
  SSL* ssl = nullptr;
  BIO* rbio = nullptr;
  BIO* wbio = nullptr;
  nghttp2_session* h2 = nullptr;
  bool handshaking = true;
  bool settingsSeen = false;
  bool closing = false;
  std::string expected;  // client: the identity the server must present
  std::string peer;      // the peer's identity
  std::string source, local;
  int sourcePort = 0, localPort = 0;
  Clock::time_point deadline;  // handshake, then the first SETTINGS
  int pingIntervalMs = 0, pingTimeoutMs = 0;
  Clock::time_point nextPing, pingDeadline;
  bool pingOutstanding = false;
  Buffer out;  // HTTP/2 output not yet encrypted
  Buffer enc;  // encrypted output the socket has not taken yet
  std::map<int32_t, std::unique_ptr<Stream>> streams;
  std::vector<Stream*> wantRead;  // paused streams whose buffer drained
  std::string closeReason, closeDetail;
  bool protocolError = false;
  bool dying = false;  // being closed: its streams are finished in place
};

struct Listener {
  uint64_t id = 0;
  int fd = -1;
  SSL_CTX* ctx = nullptr;
};

class HboneEngine;
HboneEngine* gEngine = nullptr;

class HboneEngine {
 public:
  HboneEngine(Napi::Env env, Napi::Function onEvent) {
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    tsfn_ = Napi::ThreadSafeFunction::New(env, onEvent, "nodemesh.hbone", 0, 1);
    tsfn_.Unref(env);
    nghttp2_session_callbacks_new(&callbacks_);
    nghttp2_session_callbacks_set_on_begin_headers_callback(callbacks_, OnBeginHeaders);
    nghttp2_session_callbacks_set_on_header_callback(callbacks_, OnHeader);
    nghttp2_session_callbacks_set_on_frame_recv_callback(callbacks_, OnFrameRecv);
    nghttp2_session_callbacks_set_on_data_chunk_recv_callback(callbacks_, OnDataChunk);
    nghttp2_session_callbacks_set_on_stream_close_callback(callbacks_, OnStreamClose);
    nghttp2_session_callbacks_set_on_frame_send_callback(callbacks_, OnFrameSend);
    nghttp2_session_callbacks_set_data_source_read_length_callback(callbacks_, ReadLength);
    nghttp2_option_new(&option_);
    nghttp2_option_set_no_auto_window_update(option_, 1);
    nghttp2_option_set_max_send_header_block_length(option_, kMaxHeaderList);
    // The engine's epoll set is one readable fd in the JS thread's loop; its handles do not keep
    // the process alive (Hold does, through the event function, while JS waits for an event).
    napi_get_uv_event_loop(env, &loop_);
    poll_ = new uv_poll_t;
    uv_poll_init(loop_, poll_, epfd_);
    poll_->data = this;
    uv_poll_start(poll_, UV_READABLE, [](uv_poll_t* h, int, int) { static_cast<HboneEngine*>(h->data)->Iterate(); });
    uv_unref(reinterpret_cast<uv_handle_t*>(poll_));
    timer_ = new uv_timer_t;
    uv_timer_init(loop_, timer_);
    timer_->data = this;
    uv_timer_start(timer_, [](uv_timer_t* t) {
      auto* e = static_cast<HboneEngine*>(t->data);
      if (!e->stop_) e->Timers();
    }, kTimersMs, kTimersMs);
    uv_unref(reinterpret_cast<uv_handle_t*>(timer_));
    // Work left for the next turn of the loop (commands, connections to settle again): the idle
    // handle keeps the loop from blocking while it is started.
    again_ = new uv_idle_t;
    uv_idle_init(loop_, again_);
    again_->data = this;
    uv_unref(reinterpret_cast<uv_handle_t*>(again_));
    napi_add_env_cleanup_hook(env, [](void* self) { static_cast<HboneEngine*>(self)->Stop(); }, this);
  }

  void Stop() {
    if (stop_) return;
    stop_ = true;
    CloseHandle(poll_);
    CloseHandle(timer_);
    CloseHandle(again_);
  }

  // Runs fn on the engine's next turn (never inside the call that posts it: a command from JS
  // never runs in the middle of the engine's own work up the stack).
  void Post(std::function<void()> fn) {
    commands_.push_back(std::move(fn));
    Schedule();
  }

  void Schedule() {
    if (!stop_ && !scheduled_) {
      scheduled_ = true;
      uv_idle_start(again_, [](uv_idle_t* h) { static_cast<HboneEngine*>(h->data)->Iterate(); });
    }
  }

  uint64_t NextId() { return ++nextId_; }

  // While JS waits for an event, the engine keeps the process alive (as a pending socket would).
  void Hold(Napi::Env env, bool hold) {
    if (hold) tsfn_.Ref(env);
    else tsfn_.Unref(env);
  }

  // --- commands (run by Iterate, posted from JS) ---

  void Dial(uint64_t id, int fd, SSL_CTX* ctx, std::string expected) {
    auto c = NewConn(id, fd, ctx, false);
    if (!c) return Emit(Event{"dialed"}.N("conn", static_cast<double>(id)).S("reason", "tls").S("error", SslError("SSL_new")));
    c->expected = std::move(expected);
    c->pingIntervalMs = 10000;
    c->pingTimeoutMs = 20000;
    Conn& ref = *c;
    conns_.emplace(id, std::move(c));
    Register(ref.fd, Tag(ref.id, 0));
    Handshake(ref);
    Settle(ref);
  }

  void Serve(uint64_t id, int fd, SSL_CTX* ctx) {
    auto l = std::make_unique<Listener>();
    l->id = id;
    l->fd = fd;
    l->ctx = ctx;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    epoll_event ev = {};
    ev.events = EPOLLIN;
    ev.data.u64 = Tag(id, kListenerTag);
    epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev);
    listeners_.emplace(id, std::move(l));
  }

  void SetServerContext(uint64_t id, SSL_CTX* ctx) {
    auto it = listeners_.find(id);
    if (it == listeners_.end()) {
      SSL_CTX_free(ctx);
      return;
    }
    SSL_CTX_free(it->second->ctx);
    it->second->ctx = ctx;
  }

  // Stops accepting (the listening fd is closed) but keeps the server's connections and context:
  // the agent handing its node over lets them end on their own.
  void StopListening(uint64_t id) {
    auto it = listeners_.find(id);
    if (it == listeners_.end() || it->second->fd < 0) return;
    epoll_ctl(epfd_, EPOLL_CTL_DEL, it->second->fd, nullptr);
    close(it->second->fd);
    it->second->fd = -1;
    // GOAWAY on each of its tunnels: their streams go on, and clients open new ones elsewhere (a
    // stream they opened meanwhile is refused before it reaches anything: they may send it again).
    std::vector<uint64_t> ids;
    for (auto& [cid, c] : conns_) if (c->server == id && c->h2 && !c->closing && !c->handshaking) ids.push_back(cid);
    for (uint64_t cid : ids) {
      auto found = conns_.find(cid);
      if (found == conns_.end()) continue;
      Conn& c = *found->second;
      nghttp2_submit_goaway(c.h2, NGHTTP2_FLAG_NONE, nghttp2_session_get_last_proc_stream_id(c.h2), NGHTTP2_NO_ERROR, nullptr, 0);
      Settle(c);
    }
  }

  void CloseServer(uint64_t id) {
    auto it = listeners_.find(id);
    if (it != listeners_.end()) {
      StopListening(id);
      SSL_CTX_free(it->second->ctx);
      listeners_.erase(it);
    }
    std::vector<uint64_t> ids;
    for (auto& [cid, c] : conns_) if (c->server == id) ids.push_back(cid);
    for (uint64_t cid : ids) CloseConn(cid, "server_closed", "");
  }

  void Request(uint64_t conn, uint64_t handle, std::string authority, std::string forwarded) {
    auto it = conns_.find(conn);
    if (it == conns_.end() || it->second->handshaking || it->second->closing) {
      return Emit(Event{"response"}.N("handle", static_cast<double>(handle)).S("error", "the tunnel is closed"));
    }
    Conn& c = *it->second;
    auto s = std::make_unique<Stream>();
    s->handle = handle;
    s->conn = &c;
    s->last = Clock::now();
    nghttp2_nv nva[] = {
        Nv(":method", "CONNECT"),
        Nv(":authority", authority),
        Nv("forwarded", forwarded),
    };
    nghttp2_data_provider prd;
    prd.source.ptr = s.get();
    prd.read_callback = ReadFromApp;
    int32_t sid = nghttp2_submit_request(c.h2, nullptr, nva, forwarded.empty() ? 2 : 3, &prd, s.get());
    if (sid < 0) {
      return Emit(Event{"response"}.N("handle", static_cast<double>(handle)).S("error", std::string("CONNECT: ") + nghttp2_strerror(sid)));
    }
    s->id = sid;
    handles_[handle] = s.get();
    c.streams.emplace(sid, std::move(s));
    Settle(c);
  }

  // Delivers a stream to an application socket (server: answering 200 first). Takes the fd.
  // `initial`: bytes of the application's already read (a sniffed connection's first ones), sent first.
  void Attach(uint64_t handle, uint64_t relay, int fd, std::shared_ptr<Channel> ch, int idleMs, const std::string& initial) {
    auto it = handles_.find(handle);
    if (it == handles_.end()) {
      if (fd >= 0) close(fd);
      if (ch) ch->Close(1, true);
      return Emit(Event{"relayed"}.N("relay", static_cast<double>(relay)).N("bytesFromApp", 0).N("bytesToApp", 0).S("error", "the tunnel stream is gone").S("reason", "reset"));
    }
    Stream& s = *it->second;
    Conn& c = *s.conn;
    s.appFd = fd;
    s.ch = std::move(ch);
    if (s.ch) s.ch->Bind(1, &s);
    s.relay = relay;
    s.idleMs = idleMs;
    s.last = Clock::now();
    if (!initial.empty()) s.fromApp.append(initial.data(), initial.size());
    if (fd >= 0) fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    if (s.h2Closed && (s.rstCode != NGHTTP2_NO_ERROR || !s.peerEnd)) {
      s.error = "stream reset (code " + std::to_string(s.rstCode) + ")";
      s.reason = "reset";
      s.reset = true;
      FinishStream(s);
      return Settle(c);
    }
    if (c.server) {
      nghttp2_nv nva[] = {Nv(":status", "200")};
      nghttp2_data_provider prd;
      prd.source.ptr = &s;
      prd.read_callback = ReadFromApp;
      s.answered = true;
      int rv = nghttp2_submit_response(c.h2, s.id, nva, 1, &prd);
      if (rv != 0) {
        s.error = std::string("response: ") + nghttp2_strerror(rv);
        s.reason = "error";
        s.reset = true;
        FinishStream(s);
        return Settle(c);
      }
    } else if (s.deferred) {
      s.deferred = false;
      nghttp2_session_resume_data(c.h2, s.id);
    }
    if (fd >= 0) AppEvents(s, EPOLL_CTL_ADD);
    OnAppSide(s);
  }

  // Server: ends a CONNECT with a status and no tunnel.
  void Answer(uint64_t handle, int status) {
    auto it = handles_.find(handle);
    if (it == handles_.end()) return;
    Stream& s = *it->second;
    Conn& c = *s.conn;
    s.finished = true;
    handles_.erase(it);
    if (!s.h2Closed && !s.answered) {
      s.answered = true;
      std::string code = std::to_string(status);
      nghttp2_nv nva[] = {Nv(":status", code)};
      nghttp2_submit_response(c.h2, s.id, nva, 1, nullptr);
    }
    Reap(c, s);
    Settle(c);
  }

  // Ends a stream with RST_STREAM (CANCEL) and the relay on it (its application socket with a reset).
  void Cancel(uint64_t handle) {
    auto it = handles_.find(handle);
    if (it == handles_.end()) return;
    Stream& s = *it->second;
    Conn& c = *s.conn;
    s.error = s.error.empty() ? "cancelled" : s.error;
    s.reason = s.reason.empty() ? "reset" : s.reason;
    s.reset = true;
    FinishStream(s);
    Settle(c);
  }

  // A tunnel closed by its owner (idle, the pod left): GOAWAY, then closed.
  void Close(uint64_t conn) {
    auto it = conns_.find(conn);
    if (it == conns_.end()) return;
    Conn& c = *it->second;
    if (c.h2 && !c.closing) {
      c.closing = true;
      nghttp2_session_terminate_session(c.h2, NGHTTP2_NO_ERROR);
      Settle(c);
    } else {
      CloseConn(conn, "closed", "");
    }
  }

  void AbortAll() {
    std::vector<uint64_t> ids;
    for (auto& [id, c] : conns_) ids.push_back(id);
    for (uint64_t id : ids) CloseConn(id, "proxy_stopping", "");
    std::vector<uint64_t> ls;
    for (auto& [id, l] : listeners_) ls.push_back(id);
    for (uint64_t id : ls) CloseServer(id);
  }

 private:
  static constexpr uint64_t kListenerTag = 0xffffffffull;

  static uint64_t Tag(uint64_t conn, uint64_t sub) { return (conn << 32) | sub; }

  static nghttp2_nv Nv(const char* name, const std::string& value) {
    nghttp2_nv nv;
    nv.name = reinterpret_cast<uint8_t*>(const_cast<char*>(name));
    nv.namelen = strlen(name);
    nv.value = reinterpret_cast<uint8_t*>(const_cast<char*>(value.data()));
    nv.valuelen = value.size();
    nv.flags = NGHTTP2_NV_FLAG_NONE;
    return nv;
  }

  void Register(int fd, uint64_t tag) {
    epoll_event ev = {};
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = tag;
    epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev);
  }

  void Emit(Event e) {
    auto* ev = new Event(std::move(e));
    napi_status st = tsfn_.NonBlockingCall(ev, [](Napi::Env env, Napi::Function fn, Event* e) {
      // The environment is going away (the process exits): nothing to tell.
      if (static_cast<napi_env>(env) == nullptr || fn.IsEmpty()) {
        delete e;
        return;
      }
      std::unique_ptr<Event> owned(e);
      try {
        Napi::Object o = Napi::Object::New(env);
        o.Set("type", Napi::String::New(env, e->type));
        for (auto& [k, v] : e->strings) o.Set(k, Napi::String::New(env, v));
        for (auto& [k, v] : e->numbers) o.Set(k, Napi::Number::New(env, v));
        fn.Call({o});
      } catch (const Napi::Error& err) {
        // What the handler threw is the process's uncaught exception, as for any event callback
        // (a C call: while node tears down, throwing can fail, and that must not abort).
        napi_throw(env, err.Value());
      }
    });
    if (st != napi_ok) delete ev;
  }

  std::unique_ptr<Conn> NewConn(uint64_t id, int fd, SSL_CTX* ctx, bool server) {
    auto c = std::make_unique<Conn>();
    c->id = id;
    c->fd = fd;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, 1 /* TCP_NODELAY */, &one, sizeof(one));
    c->ssl = SSL_new(ctx);
    if (!c->ssl) {
      close(fd);
      return nullptr;
    }
    c->rbio = BIO_new(BIO_s_mem());
    c->wbio = BIO_new(BIO_s_mem());
    BIO_set_mem_eof_return(c->rbio, -1);
    SSL_set_bio(c->ssl, c->rbio, c->wbio);
    if (server) SSL_set_accept_state(c->ssl);
    else SSL_set_connect_state(c->ssl);
    c->deadline = Clock::now() + std::chrono::milliseconds(kHandshakeMs);
    sockaddr_storage ss = {};
    socklen_t len = sizeof(ss);
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) c->source = AddressOf(ss, &c->sourcePort);
    len = sizeof(ss);
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len) == 0) c->local = AddressOf(ss, &c->localPort);
    return c;
  }

  void Accept(Listener& l) {
    for (;;) {
      int fd = accept4(l.fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (fd < 0) return;
      uint64_t id = NextId();
      auto c = NewConn(id, fd, l.ctx, true);
      if (!c) continue;
      c->server = l.id;
      c->pingIntervalMs = 5000;
      c->pingTimeoutMs = 5000;
      Conn& ref = *c;
      conns_.emplace(id, std::move(c));
      Register(ref.fd, Tag(id, 0));
    }
  }

  // Reads what the socket has into the TLS input. False at EOF or on an error.
  bool ReadSocket(Conn& c) {
    char buf[kSocketRead];
    for (;;) {
      ssize_t n = read(c.fd, buf, sizeof(buf));
      if (n > 0) {
        BIO_write(c.rbio, buf, static_cast<int>(n));
        if (static_cast<size_t>(n) < sizeof(buf)) return true;
        continue;
      }
      if (n == 0) {
        c.closeReason = c.closeReason.empty() ? "eof" : c.closeReason;
        return false;
      }
      if (errno == EAGAIN || errno == EINTR) return true;
      c.closeReason = "socket";
      c.closeDetail = strerror(errno);
      return false;
    }
  }

  // Writes encrypted bytes out. False on an error.
  bool WriteSocket(Conn& c) {
    for (;;) {
      if (c.enc.empty()) {
        int pending = static_cast<int>(BIO_pending(c.wbio));
        if (pending <= 0) return true;
        int got = BIO_read(c.wbio, c.enc.space(static_cast<size_t>(pending)), pending);
        if (got > 0) c.enc.commit(static_cast<size_t>(got));
        if (c.enc.empty()) return true;
      }
      ssize_t n = write(c.fd, c.enc.data(), c.enc.size());
      if (n < 0) {
        if (errno == EAGAIN || errno == EINTR) return true;
        c.closeReason = "socket";
        c.closeDetail = strerror(errno);
        return false;
      }
      c.enc.consume(static_cast<size_t>(n));
    }
  }

  static long Pending(Conn& c) { return static_cast<long>(c.enc.size()) + static_cast<long>(BIO_pending(c.wbio)); }

  // Advances the TLS handshake; on success sets up HTTP/2. False when it failed (closed).
  void Handshake(Conn& c) {
    ERR_clear_error();
    int rv = SSL_do_handshake(c.ssl);
    if (rv != 1) {
      int err = SSL_get_error(c.ssl, rv);
      if (err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE) return;
      return FailHandshake(c, "tls", SslError("TLS handshake"));
    }
    const unsigned char* alpn = nullptr;
    unsigned int alpnLen = 0;
    SSL_get0_alpn_selected(c.ssl, &alpn, &alpnLen);
    if (alpnLen != 2 || memcmp(alpn, "h2", 2) != 0) return FailHandshake(c, "tls", "ALPN is not h2");
    c.peer = PeerUri(c.ssl);
    if (!c.server && c.peer != c.expected) {
      return FailHandshake(c, "identity_mismatch", "presented " + (c.peer.empty() ? std::string("no workload identity") : c.peer) + ", not " + c.expected);
    }
    c.handshaking = false;
    int rc = c.server ? nghttp2_session_server_new2(&c.h2, callbacks_, &c, option_) : nghttp2_session_client_new2(&c.h2, callbacks_, &c, option_);
    if (rc != 0) return FailHandshake(c, "h2", nghttp2_strerror(rc));
    std::vector<nghttp2_settings_entry> iv = {
        {NGHTTP2_SETTINGS_INITIAL_WINDOW_SIZE, static_cast<uint32_t>(kStreamWindow)},
        {NGHTTP2_SETTINGS_MAX_FRAME_SIZE, kMaxFrame},
    };
    if (c.server) {
      iv.push_back({NGHTTP2_SETTINGS_MAX_CONCURRENT_STREAMS, kServerMaxStreams});
      iv.push_back({NGHTTP2_SETTINGS_MAX_HEADER_LIST_SIZE, kMaxHeaderList});
    } else {
      iv.push_back({NGHTTP2_SETTINGS_ENABLE_PUSH, 0});
    }
    nghttp2_submit_settings(c.h2, NGHTTP2_FLAG_NONE, iv.data(), iv.size());
    nghttp2_session_set_local_window_size(c.h2, NGHTTP2_FLAG_NONE, 0, kConnectionWindow);
    auto now = Clock::now();
    c.deadline = now + std::chrono::milliseconds(kHandshakeMs);
    c.nextPing = now + std::chrono::milliseconds(c.pingIntervalMs);
    if (!c.server) {
      Emit(Event{"dialed"}.N("conn", static_cast<double>(c.id)));
    }
  }

  void FailHandshake(Conn& c, const char* reason, std::string detail) {
    if (c.server) {
      c.closeReason = "tls_handshake";
      c.closeDetail = std::move(detail);
    } else {
      Emit(Event{"dialed"}.N("conn", static_cast<double>(c.id)).S("reason", reason).S("error", detail));
      c.closeReason = "dial_failed";
    }
    c.closing = true;
    c.handshaking = true;  // never reported as a tunnel
  }

  // Feeds received TLS records through TLS and HTTP/2. False when the connection must end.
  bool Receive(Conn& c) {
    if (c.handshaking) {
      Handshake(c);
      if (c.handshaking) return !c.closing;
    }
    char buf[64 * 1024];
    for (;;) {
      ERR_clear_error();
      int n = SSL_read(c.ssl, buf, sizeof(buf));
      if (n > 0) {
        ssize_t used = nghttp2_session_mem_recv(c.h2, reinterpret_cast<uint8_t*>(buf), static_cast<size_t>(n));
        if (used < 0) {
          c.closeReason = "h2_error";
          c.closeDetail = nghttp2_strerror(static_cast<int>(used));
          c.protocolError = true;
          return false;
        }
        continue;
      }
      int err = SSL_get_error(c.ssl, n);
      if (err == SSL_ERROR_WANT_READ) return true;
      if (err == SSL_ERROR_ZERO_RETURN) {
        c.closeReason = "eof";
        return false;
      }
      c.closeReason = "tls";
      c.closeDetail = SslError("TLS");
      return false;
    }
  }

  // Moves HTTP/2 output through TLS to the socket, as far as the socket takes it. False on an error.
  bool Send(Conn& c) {
    for (int round = 0; round < 64; round++) {
      if (!c.handshaking && c.h2 && Pending(c) < static_cast<long>(kEncryptedHigh)) {
        while (c.out.size() < kOutBatch) {
          const uint8_t* data = nullptr;
          ssize_t n = nghttp2_session_mem_send(c.h2, &data);
          if (n < 0) {
            c.closeReason = "h2_error";
            c.closeDetail = nghttp2_strerror(static_cast<int>(n));
            return false;
          }
          if (n == 0) break;
          c.out.append(data, static_cast<size_t>(n));
        }
        if (!c.out.empty()) {
          ERR_clear_error();
          int n = SSL_write(c.ssl, c.out.data(), static_cast<int>(c.out.size()));
          c.out.clear();
          if (n <= 0) {
            c.closeReason = "tls";
            c.closeDetail = SslError("TLS write");
            return false;
          }
        }
      }
      if (!WriteSocket(c)) return false;
      // Streams that were paused on a full buffer read again now that it drained.
      std::vector<Stream*> ready;
      ready.swap(c.wantRead);
      for (Stream* s : ready) ReadApp(*s);
      bool more = c.h2 && !c.handshaking && nghttp2_session_want_write(c.h2) && Pending(c) < static_cast<long>(kEncryptedHigh);
      if (!more && c.wantRead.empty()) return true;
    }
    runnable_.insert(c.id);
    return true;
  }

  // After any change to a connection: output flushed, finished streams reaped, a dead connection closed.
  void Settle(Conn& c) {
    uint64_t id = c.id;
    bool ok = Send(c);
    if (!ok) return CloseConn(id, c.closeReason, c.closeDetail);
    if (c.closing && (c.handshaking || !c.h2)) {
      if (Pending(c) == 0 || c.closeReason == "dial_failed") return CloseConn(id, c.closeReason, c.closeDetail);
    }
    if (c.h2 && !nghttp2_session_want_read(c.h2) && !nghttp2_session_want_write(c.h2) && Pending(c) == 0) {
      return CloseConn(id, c.closeReason.empty() ? (c.protocolError ? "h2_error" : "closed") : c.closeReason, c.closeDetail);
    }
  }

  // Reads from the application into the stream's buffer while it has room.
  void ReadApp(Stream& s) {
    if (!s.Attached() || s.appEof || s.finished) return;
    Conn& c = *s.conn;
    bool got = false;
    if (s.ch) {
      // A channel: what the HTTP engine queued, as far as the buffer has room.
      Channel& ch = *s.ch;
      if (ch.WasReset(1)) return AppFailed(s, ECONNRESET, "read");
      const std::string& in = ch.Inbox(1);
      size_t room = s.fromApp.size() < kAppBuffer ? kAppBuffer - s.fromApp.size() : 0;
      size_t n = std::min(room, in.size());
      if (n > 0) {
        s.fromApp.append(in.data(), n);
        ch.Consumed(1, n);
        got = true;
      }
      if (!in.empty()) s.appPaused = true;
      else if (ch.AtEnd(1)) s.appEof = got = true;
    } else {
      for (;;) {
        if (s.fromApp.size() >= kAppBuffer) {
          s.appPaused = true;
          break;
        }
        ssize_t n = read(s.appFd, s.fromApp.space(kAppRead), kAppRead);
        if (n > 0) {
          s.fromApp.commit(static_cast<size_t>(n));
          got = true;
          continue;
        }
        if (n == 0) {
          s.appEof = true;
          got = true;
          break;
        }
        if (errno == EAGAIN || errno == EINTR) break;
        AppFailed(s, errno, "read");
        return;
      }
    }
    if (got) {
      s.last = Clock::now();
      if (s.deferred && (c.server ? s.answered : true)) {
        s.deferred = false;
        nghttp2_session_resume_data(c.h2, s.id);
      }
    }
  }

  // Writes what the peer sent to the application; its window opens as it is written.
  void WriteApp(Stream& s) {
    if (!s.Attached() || s.finished) return;
    Conn& c = *s.conn;
    while (!s.toApp.empty()) {
      ssize_t n;
      if (s.ch) {
        // A channel: as much as it has room for; it says when the HTTP engine made more.
        if (s.ch->PeerClosed(1)) n = -1, errno = s.ch->WasReset(1) ? ECONNRESET : EPIPE;
        else if ((n = static_cast<ssize_t>(std::min(s.toApp.size(), s.ch->Room(1)))) == 0) return;
        else s.ch->Write(1, s.toApp.data(), static_cast<size_t>(n));
      } else {
        n = write(s.appFd, s.toApp.data(), s.toApp.size());
      }
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN) return WantOut(s, true);
        AppFailed(s, errno, "write");
        return;
      }
      s.toApp.consume(static_cast<size_t>(n));
      s.bytesToApp += static_cast<uint64_t>(n);
      s.last = Clock::now();
      if (!s.h2Closed) nghttp2_session_consume(c.h2, s.id, static_cast<size_t>(n));
      else nghttp2_session_consume_connection(c.h2, static_cast<size_t>(n));
    }
    WantOut(s, false);
    if (s.peerEnd && !s.appShut) ShutApp(s);
    MaybeFinish(s);
  }

  // The peer's END_STREAM passed on: a FIN to the application.
  void ShutApp(Stream& s) {
    s.appShut = true;
    if (s.ch) s.ch->Shut(1);
    else shutdown(s.appFd, SHUT_WR);
  }

  void WantOut(Stream& s, bool want) {
    if (s.wantOut == want || s.appFd < 0) return;
    s.wantOut = want;
    AppEvents(s, EPOLL_CTL_MOD);
  }

  // The application socket's registration: kAppEvents, and EPOLLOUT while a write waits (wantOut).
  void AppEvents(Stream& s, int op) {
    epoll_event ev = {};
    ev.events = kAppEvents | (s.wantOut ? EPOLLOUT : 0u);
    ev.data.u64 = Tag(s.conn->id, static_cast<uint64_t>(s.id));
    epoll_ctl(epfd_, op, s.appFd, &ev);
  }

  void AppFailed(Stream& s, int err, const char* op) {
    s.error = std::string(op) + ": " + strerror(err);
    s.reason = err == ECONNRESET ? "reset" : "error";
    s.reset = true;
    FinishStream(s);
  }

  // The relay ends when both directions have ended: the stream closed on HTTP/2, all it carried written.
  void MaybeFinish(Stream& s) {
    if (s.finished || !s.Attached()) return;
    if (!s.h2Closed) return;
    if (s.rstCode != NGHTTP2_NO_ERROR) {
      s.error = "stream reset (code " + std::to_string(s.rstCode) + ")";
      s.reason = "reset";
      s.reset = true;
      return FinishStream(s);
    }
    if (!s.toApp.empty()) return;
    if (!s.appShut && s.peerEnd) ShutApp(s);
    FinishStream(s);
  }

  // Reports the relay, closes the application socket (with a reset on failure), forgets the handle.
  void FinishStream(Stream& s) {
    if (s.finished) return;
    s.finished = true;
    handles_.erase(s.handle);
    if (s.ch) {
      s.ch->Close(1, s.reset);
      s.ch.reset();
    }
    if (s.appFd >= 0) {
      epoll_ctl(epfd_, EPOLL_CTL_DEL, s.appFd, nullptr);
      if (s.reset) {
        struct linger lg = {1, 0};
        setsockopt(s.appFd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
      }
      close(s.appFd);
      s.appFd = -1;
    }
    if (s.relay != 0) {
      Event e{"relayed"};
      e.N("relay", static_cast<double>(s.relay)).N("bytesFromApp", static_cast<double>(s.bytesFromApp)).N("bytesToApp", static_cast<double>(s.bytesToApp));
      if (!s.error.empty()) e.S("error", s.error);
      if (!s.reason.empty()) e.S("reason", s.reason);
      Emit(std::move(e));
    } else if (!s.conn->server && !s.responded) {
      Emit(Event{"response"}.N("handle", static_cast<double>(s.handle)).S("error", s.error.empty() ? "stream closed before an answer" : s.error));
    }
    // Bytes still waiting for the application are given back to the connection's window.
    if (!s.toApp.empty() && s.conn->h2) nghttp2_session_consume_connection(s.conn->h2, s.toApp.size());
    s.toApp.release();
    s.fromApp.release();
    if (!s.h2Closed && s.conn->h2) nghttp2_submit_rst_stream(s.conn->h2, NGHTTP2_FLAG_NONE, s.id, s.reason.empty() ? NGHTTP2_NO_ERROR : NGHTTP2_CANCEL);
    Reap(*s.conn, s);
  }

  // A stream closed on HTTP/2 and finished here is forgotten.
  void Reap(Conn& c, Stream& s) {
    if (!s.h2Closed || !s.finished || c.dying) return;
    auto& v = c.wantRead;
    v.erase(std::remove(v.begin(), v.end(), &s), v.end());
    c.streams.erase(s.id);
  }

  void CloseConn(uint64_t id, const std::string& reason, const std::string& detail) {
    auto it = conns_.find(id);
    if (it == conns_.end()) return;
    std::unique_ptr<Conn> owned = std::move(it->second);
    conns_.erase(it);
    runnable_.erase(id);
    Conn& c = *owned;
    c.dying = true;
    for (auto& [sid, s] : c.streams) {
      if (s->finished) continue;
      s->error = "tunnel closed" + (reason.empty() ? std::string() : " (" + reason + ")");
      s->reason = reason == "proxy_stopping" ? "proxy_stopping" : "reset";
      s->reset = true;
      s->h2Closed = true;
      FinishStream(*s);
    }
    for (auto h = handles_.begin(); h != handles_.end();) {
      if (h->second->conn == &c) h = handles_.erase(h);
      else ++h;
    }
    // The session first: nothing of nghttp2's may point at a stream once it is freed.
    if (c.h2) nghttp2_session_del(c.h2);
    c.h2 = nullptr;
    c.streams.clear();
    epoll_ctl(epfd_, EPOLL_CTL_DEL, c.fd, nullptr);
    close(c.fd);
    SSL_free(c.ssl);
    Event e{"closed"};
    e.N("conn", static_cast<double>(id)).S("reason", reason);
    if (!detail.empty()) e.S("detail", detail);
    if (c.server) {
      e.N("server", static_cast<double>(c.server)).S("source", c.source);
      if (c.handshaking && reason != "tls_handshake") e.S("during", "tls");
      else if (!c.handshaking && !c.settingsSeen) e.S("during", "h2");
    }
    if (c.server || reason != "dial_failed") Emit(std::move(e));
  }

  // --- nghttp2 callbacks ---

  static Conn& ConnOf(void* user) { return *static_cast<Conn*>(user); }

  static Stream* StreamOf(nghttp2_session* session, int32_t id) { return static_cast<Stream*>(nghttp2_session_get_stream_user_data(session, id)); }

  static ssize_t ReadLength(nghttp2_session*, uint8_t, int32_t, int32_t sessionWindow, int32_t streamWindow, uint32_t remoteMaxFrame, void*) {
    ssize_t n = std::min<ssize_t>({static_cast<ssize_t>(sessionWindow), static_cast<ssize_t>(streamWindow), static_cast<ssize_t>(remoteMaxFrame), kSendFrame});
    return n > 0 ? n : 1;
  }

  static ssize_t ReadFromApp(nghttp2_session* session, int32_t id, uint8_t* buf, size_t length, uint32_t* flags, nghttp2_data_source* source, void*) {
    auto* s = static_cast<Stream*>(source->ptr);
    if (s->finished) {
      *flags |= NGHTTP2_DATA_FLAG_EOF;
      return 0;
    }
    size_t avail = s->fromApp.size();
    if (avail == 0 || !s->Attached()) {
      if (s->appEof && s->Attached()) {
        *flags |= NGHTTP2_DATA_FLAG_EOF;
        return 0;
      }
      s->deferred = true;
      return NGHTTP2_ERR_DEFERRED;
    }
    size_t n = std::min(length, avail);
    memcpy(buf, s->fromApp.data(), n);
    s->fromApp.consume(n);
    s->bytesFromApp += n;
    if (s->fromApp.empty() && s->appEof) *flags |= NGHTTP2_DATA_FLAG_EOF;
    if (s->appPaused && s->fromApp.size() < kAppBuffer / 2) {
      s->appPaused = false;
      s->conn->wantRead.push_back(s);
    }
    return static_cast<ssize_t>(n);
  }

  static int OnBeginHeaders(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    Conn& c = ConnOf(user);
    if (!c.server || frame->hd.type != NGHTTP2_HEADERS || frame->headers.cat != NGHTTP2_HCAT_REQUEST) return 0;
    auto s = std::make_unique<Stream>();
    s->id = frame->hd.stream_id;
    s->conn = &c;
    s->last = Clock::now();
    nghttp2_session_set_stream_user_data(session, s->id, s.get());
    c.streams.emplace(s->id, std::move(s));
    return 0;
  }

  static int OnHeader(nghttp2_session* session, const nghttp2_frame* frame, const uint8_t* name, size_t namelen, const uint8_t* value, size_t valuelen, uint8_t, void*) {
    if (frame->hd.type != NGHTTP2_HEADERS) return 0;
    Stream* s = StreamOf(session, frame->hd.stream_id);
    if (!s) return 0;
    std::string n(reinterpret_cast<const char*>(name), namelen);
    std::string v(reinterpret_cast<const char*>(value), valuelen);
    if (n == ":method") s->method = v;
    else if (n == ":authority") s->authority = v;
    else if (n == "forwarded") s->forwarded = v;
    else if (n == ":status") s->status = v;
    return 0;
  }

  static int OnFrameRecv(nghttp2_session* session, const nghttp2_frame* frame, void* user) {
    Conn& c = ConnOf(user);
    switch (frame->hd.type) {
      case NGHTTP2_SETTINGS:
        if (!(frame->hd.flags & NGHTTP2_FLAG_ACK)) c.settingsSeen = true;
        break;
      case NGHTTP2_PING:
        if (frame->hd.flags & NGHTTP2_FLAG_ACK) c.pingOutstanding = false;
        break;
      case NGHTTP2_GOAWAY:
        if (!c.server) gEngine->Emit(Event{"draining"}.N("conn", static_cast<double>(c.id)));
        break;
      case NGHTTP2_HEADERS: {
        Stream* s = StreamOf(session, frame->hd.stream_id);
        if (!s) break;
        if (c.server && frame->headers.cat == NGHTTP2_HCAT_REQUEST) {
          s->handle = gEngine->NextId();
          gEngine->handles_[s->handle] = s;
          gEngine->Emit(Event{"request"}
                            .N("server", static_cast<double>(c.server))
                            .N("conn", static_cast<double>(c.id))
                            .N("handle", static_cast<double>(s->handle))
                            .S("method", s->method)
                            .S("authority", s->authority)
                            .S("forwarded", s->forwarded)
                            .S("peer", c.peer)
                            .S("source", c.source)
                            .N("sourcePort", c.sourcePort)
                            .S("local", c.local));
        } else if (!c.server && frame->headers.cat == NGHTTP2_HCAT_RESPONSE && !s->responded) {
          int status = atoi(s->status.c_str());
          if (status >= 100 && status < 200) break;  // interim
          s->responded = true;
          gEngine->Emit(Event{"response"}.N("handle", static_cast<double>(s->handle)).N("status", status));
        }
        if (frame->hd.flags & NGHTTP2_FLAG_END_STREAM) {
          s->peerEnd = true;
          gEngine->WriteApp(*s);
        }
        break;
      }
      case NGHTTP2_DATA: {
        Stream* s = StreamOf(session, frame->hd.stream_id);
        if (s && (frame->hd.flags & NGHTTP2_FLAG_END_STREAM)) {
          s->peerEnd = true;
          gEngine->WriteApp(*s);
        }
        break;
      }
      default:
        break;
    }
    return 0;
  }

  static int OnFrameSend(nghttp2_session*, const nghttp2_frame* frame, void* user) {
    Conn& c = ConnOf(user);
    if (frame->hd.type == NGHTTP2_GOAWAY && frame->goaway.error_code != NGHTTP2_NO_ERROR) {
      c.protocolError = true;
      c.closeReason = "h2_error";
      c.closeDetail = nghttp2_http2_strerror(frame->goaway.error_code);
    }
    return 0;
  }

  static int OnDataChunk(nghttp2_session* session, uint8_t, int32_t id, const uint8_t* data, size_t len, void* user) {
    Stream* s = StreamOf(session, id);
    if (!s || s->finished) {
      nghttp2_session_consume(session, id, len);
      return 0;
    }
    s->toApp.append(data, len);
    s->last = Clock::now();
    gEngine->WriteApp(*s);
    return 0;
  }

  static int OnStreamClose(nghttp2_session* session, int32_t id, uint32_t code, void* user) {
    Conn& c = ConnOf(user);
    Stream* s = StreamOf(session, id);
    if (!s) return 0;
    s->h2Closed = true;
    s->rstCode = code;
    if (s->finished) {
      gEngine->Reap(c, *s);
      return 0;
    }
    if (s->Attached()) {
      gEngine->MaybeFinish(*s);
    } else if (!c.server && !s->responded) {
      s->error = "stream closed before an answer (code " + std::to_string(code) + ")";
      gEngine->FinishStream(*s);
    }
    // A server stream not yet attached or answered waits for JS (which finds it reset).
    return 0;
  }

  // --- the loop ---

  void OnConn(uint64_t id, uint32_t events) {
    auto it = conns_.find(id);
    if (it == conns_.end()) return;
    Conn& c = *it->second;
    bool ok = ReadSocket(c);
    bool fed = Receive(c);
    if (conns_.find(id) == conns_.end()) return;
    if (!fed) return CloseConn(id, c.closeReason, c.closeDetail);
    if (!ok) {
      // EOF: what was received is done; the tunnel is gone.
      Send(c);
      return CloseConn(id, c.closeReason, c.closeDetail);
    }
    Settle(c);
  }

  void OnApp(uint64_t connId, int32_t sid, uint32_t events) {
    Stream* s = FindStream(connId, sid);
    if (!s) return;
    if (events & EPOLLOUT) WriteApp(*s);
    // Writing may have finished the stream and forgotten it.
    if ((events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) && (s = FindStream(connId, sid))) ReadApp(*s);
    // The tunnel settles once, after every stream that moved (Iterate's end, or the end of a batch
    // of channel notices): what all of them queued goes out in one TLS write (one TCP send, one
    // wakeup of the peer), not one per stream.
    runnable_.insert(connId);
  }

 public:
  // The application's side may have moved (a channel's notice, or just attached): what waits for
  // it is written, what it sent is read, then the tunnel settles.
  void OnAppSide(Stream& st) { OnApp(st.conn->id, st.id, EPOLLOUT | EPOLLIN); }

  // The end of a batch of channel notices: the tunnels whose streams moved settle now, in the
  // same turn, before anything else the loop runs (node's immediates, the next turn's timers).
  void SettleMoved() {
    SettleRunnable();
    if (!runnable_.empty()) Schedule();
  }

 private:
  Stream* FindStream(uint64_t connId, int32_t sid) {
    auto it = conns_.find(connId);
    if (it == conns_.end()) return nullptr;
    auto s = it->second->streams.find(sid);
    return s == it->second->streams.end() || s->second->finished ? nullptr : s->second.get();
  }

  void Timers() {
    auto now = Clock::now();
    std::vector<std::pair<uint64_t, std::string>> dead;
    // Finished after the walk: finishing one may reap it from the map being walked.
    std::vector<std::pair<uint64_t, int32_t>> idle;
    for (auto& [id, c] : conns_) {
      if ((c->handshaking || !c->settingsSeen) && now > c->deadline) {
        dead.emplace_back(id, c->handshaking ? (c->server ? "tls_handshake" : "dial_timeout") : "h2_handshake");
        continue;
      }
      if (c->handshaking || !c->h2) continue;
      if (c->pingOutstanding && now > c->pingDeadline) {
        dead.emplace_back(id, "ping_timeout");
        continue;
      }
      if (!c->pingOutstanding && now > c->nextPing) {
        nghttp2_submit_ping(c->h2, NGHTTP2_FLAG_NONE, nullptr);
        c->pingOutstanding = true;
        c->pingDeadline = now + std::chrono::milliseconds(c->pingTimeoutMs);
        c->nextPing = now + std::chrono::milliseconds(c->pingIntervalMs);
        runnable_.insert(id);
      }
      for (auto& [sid, s] : c->streams) {
        if (s->finished || !s->Attached() || s->idleMs <= 0) continue;
        if (now - s->last > std::chrono::milliseconds(s->idleMs)) {
          s->error = "idle for " + std::to_string(s->idleMs) + " ms";
          s->reason = "idle_timeout";
          runnable_.insert(id);
          idle.emplace_back(id, sid);
        }
      }
    }
    for (auto& [cid, sid] : idle) {
      auto it = conns_.find(cid);
      if (it == conns_.end()) continue;
      auto s = it->second->streams.find(sid);
      if (s == it->second->streams.end() || s->second->finished) continue;
      // The application gets a FIN, the peer a RST_STREAM (CANCEL).
      FinishStream(*s->second);
    }
    for (auto& [id, reason] : dead) {
      if (reason == "dial_timeout") {
        auto it = conns_.find(id);
        if (it != conns_.end()) Emit(Event{"dialed"}.N("conn", static_cast<double>(id)).S("reason", "tls").S("error", "no TLS handshake within 10000 ms"));
        CloseConn(id, "dial_failed", "");
      } else {
        CloseConn(id, reason, "");
      }
    }
    if (!runnable_.empty()) Schedule();
  }

  // Settles every tunnel marked to settle; one marked again while settling waits for the next turn.
  void SettleRunnable() {
    std::set<uint64_t> marked;
    marked.swap(runnable_);
    for (uint64_t id : marked) {
      auto it = conns_.find(id);
      if (it != conns_.end()) Settle(*it->second);
    }
  }

  // One turn: the commands JS posted, every ready socket, then the connections left to settle.
  void Iterate() {
    if (stop_) return;
    epoll_event events[256];
    int n = epoll_wait(epfd_, events, 256, 0);
    std::deque<std::function<void()>> commands;
    commands.swap(commands_);
    for (auto& fn : commands) fn();
    for (int i = 0; i < n; i++) {
      uint64_t tag = events[i].data.u64;
      uint64_t hi = tag >> 32, lo = tag & 0xffffffffull;
      if (lo == kListenerTag) {
        auto it = listeners_.find(hi);
        if (it != listeners_.end()) Accept(*it->second);
      } else if (lo == 0) {
        OnConn(hi, events[i].events);
      } else {
        OnApp(hi, static_cast<int32_t>(lo), events[i].events);
      }
    }
    SettleRunnable();
    if (runnable_.empty() && commands_.empty()) {
      if (scheduled_ && again_) uv_idle_stop(again_);
      scheduled_ = false;
    } else {
      Schedule();
    }
  }

  int epfd_ = -1;
  uv_loop_t* loop_ = nullptr;
  uv_poll_t* poll_ = nullptr;
  uv_timer_t* timer_ = nullptr;
  uv_idle_t* again_ = nullptr;
  bool scheduled_ = false;
  std::deque<std::function<void()>> commands_;
  std::map<uint64_t, std::unique_ptr<Conn>> conns_;
  std::map<uint64_t, std::unique_ptr<Listener>> listeners_;
  std::unordered_map<uint64_t, Stream*> handles_;
  std::set<uint64_t> runnable_;
  uint64_t nextId_ = 0;
  bool stop_ = false;
  nghttp2_session_callbacks* callbacks_ = nullptr;
  nghttp2_option* option_ = nullptr;
  Napi::ThreadSafeFunction tsfn_;
};

void Stream::ChannelChanged() { gEngine->OnAppSide(*this); }

HboneEngine& Engine(Napi::Env env) {
  if (!gEngine) throw Napi::Error::New(env, "hboneInit() was not called");
  return *gEngine;
}

// --- TLS contexts ---

std::map<uint32_t, SSL_CTX*> gContexts;
uint32_t gNextContext = 0;

SSL_CTX* MakeContext(bool server, const std::string& keyPem, const std::string& chainPem, const std::vector<std::string>& roots, std::string& err) {
  ERR_clear_error();
  SSL_CTX* ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (!ctx) {
    err = SslError("SSL_CTX_new");
    return nullptr;
  }
  auto fail = [&](const char* what) {
    err = SslError(what);
    SSL_CTX_free(ctx);
    return nullptr;
  };
  SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
  if (SSL_CTX_set_ciphersuites(ctx, kCiphers) != 1) return fail("cipher suites");
  SSL_CTX_set_num_tickets(ctx, 0);
  SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
  BIO* b = BIO_new_mem_buf(chainPem.data(), static_cast<int>(chainPem.size()));
  X509* leaf = PEM_read_bio_X509(b, nullptr, nullptr, nullptr);
  if (!leaf || SSL_CTX_use_certificate(ctx, leaf) != 1) {
    if (leaf) X509_free(leaf);
    BIO_free(b);
    return fail("certificate");
  }
  X509_free(leaf);
  while (X509* x = PEM_read_bio_X509(b, nullptr, nullptr, nullptr)) {
    if (SSL_CTX_add_extra_chain_cert(ctx, x) != 1) {
      X509_free(x);
      BIO_free(b);
      return fail("certificate chain");
    }
  }
  BIO_free(b);
  ERR_clear_error();  // the end of the PEM list
  b = BIO_new_mem_buf(keyPem.data(), static_cast<int>(keyPem.size()));
  EVP_PKEY* key = PEM_read_bio_PrivateKey(b, nullptr, nullptr, nullptr);
  BIO_free(b);
  if (!key || SSL_CTX_use_PrivateKey(ctx, key) != 1) {
    if (key) EVP_PKEY_free(key);
    return fail("private key");
  }
  EVP_PKEY_free(key);
  if (SSL_CTX_check_private_key(ctx) != 1) return fail("the key does not match the certificate");
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  for (const auto& pem : roots) {
    BIO* rb = BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size()));
    X509* root = PEM_read_bio_X509(rb, nullptr, nullptr, nullptr);
    BIO_free(rb);
    if (!root) return fail("root certificate");
    X509_STORE_add_cert(store, root);
    X509_free(root);
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  if (server) {
    SSL_CTX_set_alpn_select_cb(ctx, AlpnSelect, nullptr);
  } else if (SSL_CTX_set_alpn_protos(ctx, reinterpret_cast<const unsigned char*>("\x02h2"), 3) != 0) {
    return fail("ALPN");
  }
  return ctx;
}

// A context's SSL_CTX with a reference of its own, for the engine to keep past JS freeing it.
SSL_CTX* TakeContext(Napi::Env env, uint32_t id) {
  auto it = gContexts.find(id);
  if (it == gContexts.end()) throw Napi::Error::New(env, "unknown HBONE TLS context " + std::to_string(id));
  SSL_CTX_up_ref(it->second);
  return it->second;
}

// A server, tunnel or stream id as JS holds it (a number).
uint64_t IdArg(const Napi::CallbackInfo& info, size_t i) { return static_cast<uint64_t>(info[i].As<Napi::Number>().Int64Value()); }

// hboneInit(onEvent)
Napi::Value Init(const Napi::CallbackInfo& info) {
  if (!gEngine) {
    gEngine = new HboneEngine(info.Env(), info[0].As<Napi::Function>());
    Channels().afterBatch.push_back([] {
      if (gEngine) gEngine->SettleMoved();
    });
  }
  return info.Env().Undefined();
}

// hboneContext(server, keyPem, chainPem, roots[]): number
Napi::Value Context(const Napi::CallbackInfo& info) {
  bool server = info[0].As<Napi::Boolean>().Value();
  std::string key = info[1].As<Napi::String>().Utf8Value();
  std::string chain = info[2].As<Napi::String>().Utf8Value();
  std::vector<std::string> roots;
  Napi::Array arr = info[3].As<Napi::Array>();
  for (uint32_t i = 0; i < arr.Length(); i++) roots.push_back(arr.Get(i).As<Napi::String>().Utf8Value());
  std::string err;
  SSL_CTX* ctx = MakeContext(server, key, chain, roots, err);
  // The key's bytes leave this function's copies (std::string frees without wiping; best effort).
  OPENSSL_cleanse(&key[0], key.size());
  if (!ctx) throw Napi::Error::New(info.Env(), "HBONE TLS context: " + err);
  uint32_t id = ++gNextContext;
  gContexts[id] = ctx;
  return Napi::Number::New(info.Env(), id);
}

Napi::Value ContextFree(const Napi::CallbackInfo& info) {
  uint32_t id = info[0].As<Napi::Number>().Uint32Value();
  auto it = gContexts.find(id);
  if (it != gContexts.end()) {
    SSL_CTX_free(it->second);
    gContexts.erase(it);
  }
  return info.Env().Undefined();
}

// hboneDial(fd, context, expectedUri): conn id; a 'dialed' event follows. Takes the fd.
Napi::Value Dial(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  int fd = info[0].As<Napi::Number>().Int32Value();
  SSL_CTX* ctx = TakeContext(info.Env(), info[1].As<Napi::Number>().Uint32Value());
  std::string expected = info[2].As<Napi::String>().Utf8Value();
  uint64_t id = e.NextId();
  e.Post([&e, id, fd, ctx, expected]() {
    e.Dial(id, fd, ctx, expected);
    SSL_CTX_free(ctx);
  });
  return Napi::Number::New(info.Env(), static_cast<double>(id));
}

// hboneServe(listenFd, context): server id; 'request' and 'closed' events follow. Takes the fd.
Napi::Value Serve(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  int fd = info[0].As<Napi::Number>().Int32Value();
  SSL_CTX* ctx = TakeContext(info.Env(), info[1].As<Napi::Number>().Uint32Value());
  uint64_t id = e.NextId();
  e.Post([&e, id, fd, ctx]() { e.Serve(id, fd, ctx); });
  return Napi::Number::New(info.Env(), static_cast<double>(id));
}

Napi::Value ServerContext(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  uint64_t id = IdArg(info, 0);
  SSL_CTX* ctx = TakeContext(info.Env(), info[1].As<Napi::Number>().Uint32Value());
  e.Post([&e, id, ctx]() { e.SetServerContext(id, ctx); });
  return info.Env().Undefined();
}

Napi::Value ServerStopListening(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  uint64_t id = IdArg(info, 0);
  e.Post([&e, id]() { e.StopListening(id); });
  return info.Env().Undefined();
}

Napi::Value ServerClose(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  uint64_t id = IdArg(info, 0);
  e.Post([&e, id]() { e.CloseServer(id); });
  return info.Env().Undefined();
}

// hboneRequest(conn, authority, forwarded): stream handle; a 'response' event follows.
Napi::Value Request(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  uint64_t conn = IdArg(info, 0);
  std::string authority = info[1].As<Napi::String>().Utf8Value();
  std::string forwarded = info[2].As<Napi::String>().Utf8Value();
  uint64_t handle = e.NextId();
  e.Post([&e, conn, handle, authority, forwarded]() { e.Request(conn, handle, authority, forwarded); });
  return Napi::Number::New(info.Env(), static_cast<double>(handle));
}

// hboneAttach(handle, fd, idleMs, initial?): relay id; a 'relayed' event follows. Takes the fd;
// `initial` (a Buffer) goes to the peer before what is read from it.
Napi::Value Attach(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  uint64_t handle = IdArg(info, 0);
  // An fd, or {channel}: the HTTP/1.1 engine's upstream joined in memory (side 1 is the stream's).
  std::shared_ptr<Channel> ch = ChannelArg(info[1], 1, "hboneAttach");
  int fd = ch ? -1 : info[1].As<Napi::Number>().Int32Value();
  int idle = info[2].As<Napi::Number>().Int32Value();
  std::string initial;
  if (info.Length() > 3 && info[3].IsBuffer()) {
    auto b = info[3].As<Napi::Buffer<char>>();
    initial.assign(b.Data(), b.Length());
  }
  uint64_t relay = e.NextId();
  e.Post([&e, handle, relay, fd, ch = std::move(ch), idle, initial = std::move(initial)]() mutable { e.Attach(handle, relay, fd, std::move(ch), idle, initial); });
  return Napi::Number::New(info.Env(), static_cast<double>(relay));
}

Napi::Value Answer(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  uint64_t handle = IdArg(info, 0);
  int status = info[1].As<Napi::Number>().Int32Value();
  e.Post([&e, handle, status]() { e.Answer(handle, status); });
  return info.Env().Undefined();
}

Napi::Value Cancel(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  uint64_t handle = IdArg(info, 0);
  e.Post([&e, handle]() { e.Cancel(handle); });
  return info.Env().Undefined();
}

Napi::Value CloseTunnel(const Napi::CallbackInfo& info) {
  auto& e = Engine(info.Env());
  uint64_t conn = IdArg(info, 0);
  e.Post([&e, conn]() { e.Close(conn); });
  return info.Env().Undefined();
}

// hboneHold(hold): the engine keeps the event loop alive (true) or not (false, the default).
Napi::Value Hold(const Napi::CallbackInfo& info) {
  Engine(info.Env()).Hold(info.Env(), info[0].As<Napi::Boolean>().Value());
  return info.Env().Undefined();
}

Napi::Value AbortAll(const Napi::CallbackInfo& info) {
  if (gEngine) gEngine->Post([]() { gEngine->AbortAll(); });
  return info.Env().Undefined();
}

}  // namespace

Napi::Object InitHbone(Napi::Env env, Napi::Object exports) {
  exports.Set("hboneInit", Napi::Function::New(env, Init, "hboneInit"));
  exports.Set("hboneContext", Napi::Function::New(env, Context, "hboneContext"));
  exports.Set("hboneContextFree", Napi::Function::New(env, ContextFree, "hboneContextFree"));
  exports.Set("hboneDial", Napi::Function::New(env, Dial, "hboneDial"));
  exports.Set("hboneServe", Napi::Function::New(env, Serve, "hboneServe"));
  exports.Set("hboneServerContext", Napi::Function::New(env, ServerContext, "hboneServerContext"));
  exports.Set("hboneServerClose", Napi::Function::New(env, ServerClose, "hboneServerClose"));
  exports.Set("hboneServerStopListening", Napi::Function::New(env, ServerStopListening, "hboneServerStopListening"));
  exports.Set("hboneRequest", Napi::Function::New(env, Request, "hboneRequest"));
  exports.Set("hboneAttach", Napi::Function::New(env, Attach, "hboneAttach"));
  exports.Set("hboneAnswer", Napi::Function::New(env, Answer, "hboneAnswer"));
  exports.Set("hboneCancel", Napi::Function::New(env, Cancel, "hboneCancel"));
  exports.Set("hboneClose", Napi::Function::New(env, CloseTunnel, "hboneClose"));
  exports.Set("hboneHold", Napi::Function::New(env, Hold, "hboneHold"));
  exports.Set("hboneAbortAll", Napi::Function::New(env, AbortAll, "hboneAbortAll"));
  return exports;
}

}  // namespace nodemesh
