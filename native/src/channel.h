// SPDX-License-Identifier: Apache-2.0
// A channel joins two engines of the JS thread's loop in memory where they would otherwise talk
// through a socket pair: an HTTP engine's connection (side 0: an HTTP/1.1 or HTTP/2 engine's
// upstream or client) and an HBONE stream (side 1). It behaves as a socket pair's two ends would
// (bytes in order, a bounded queue each way, a half close each way, a close, an abortive close),
// without the four system calls and the wake-ups a request costs each way through one
// (ARCHITECTURE.md, "One loop for HTTP and HBONE").
//
// A side is told that something changed (bytes or room, an end, a reset) once the loop's current
// callbacks are done, never inside the other side's call: neither engine is re-entered in the
// middle of its work.
#pragma once

#include <napi.h>
#include <uv.h>

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace nodemesh {

// What an engine's end of a channel implements: look at the channel again.
class ChannelEnd {
 public:
  virtual void ChannelChanged() = 0;

 protected:
  ~ChannelEnd() = default;
};

class Channel {
 public:
  // Bytes queued one way above which the writer waits for room (as a socket buffer would).
  static constexpr size_t kHighWater = 256 * 1024;

  ~Channel();

  // The end `side` (0 or 1) is `end`'s until it closes.
  void Bind(int side, ChannelEnd* end) { ends_[side] = end; }

  // What `side` has to read.
  const std::string& Inbox(int side) const { return queue_[1 - side]; }
  // Room for `side` to write into before the other side reads.
  size_t Room(int side) const { return queue_[side].size() >= kHighWater ? 0 : kHighWater - queue_[side].size(); }

  // Appends bytes for the other side; false (nothing taken) once the other side closed (EPIPE).
  bool Write(int side, const char* data, size_t n) {
    if (closed_[1 - side] || closed_[side] || shut_[side]) return false;
    if (n == 0) return true;
    queue_[side].append(data, n);
    Notify(1 - side);
    return true;
  }

  // `side` took n bytes of its inbox: the writer is told when that makes room.
  void Consumed(int side, size_t n) {
    std::string& q = queue_[1 - side];
    bool wasFull = q.size() >= kHighWater;
    q.erase(0, n);
    if (wasFull && q.size() < kHighWater) Notify(1 - side);
  }

  // `side` writes no more (a FIN): the other side reads the end after what is queued.
  void Shut(int side) {
    if (shut_[side] || closed_[side]) return;
    shut_[side] = true;
    Notify(1 - side);
  }

  // `side` is done with the channel. Abortive (or with bytes it never read, as a socket closed
  // with unread data): the other side reads a reset; otherwise the end after what was queued.
  void Close(int side, bool abortive) {
    if (closed_[side]) return;
    closed_[side] = true;
    ends_[side] = nullptr;
    reset_[side] = abortive || !queue_[1 - side].empty();
    queue_[1 - side].clear();
    if (reset_[side]) queue_[side].clear();
    Notify(1 - side);
  }

  // The other side ended its writing (or closed) and `side` read all it sent.
  bool AtEnd(int side) const { return queue_[1 - side].empty() && (shut_[1 - side] || closed_[1 - side]); }
  // The other side closed abortively: what it had sent is gone too (ECONNRESET).
  bool WasReset(int side) const { return reset_[1 - side]; }
  // The other side closed: `side`'s writes fail (EPIPE).
  bool PeerClosed(int side) const { return closed_[1 - side]; }

  // Tells `side` to look again on the next turn (what it waits for may be there already).
  void Poke(int side) { Notify(side); }

  // Channels made for JS (channelNew) until both sides took theirs, by id.
  static uint32_t Make();
  // The channel `id` for `side`, once; nullptr if there is none (an unknown id, or that side was taken).
  static std::shared_ptr<Channel> Take(uint32_t id, int side);

 private:
  void Notify(int side);
  static void RunNotices();

  std::string queue_[2];  // queue_[i]: written by side i, for the other
  bool shut_[2] = {false, false};
  bool closed_[2] = {false, false};
  bool reset_[2] = {false, false};
  bool noticed_[2] = {false, false};  // a notice for that side is pending
  ChannelEnd* ends_[2] = {nullptr, nullptr};
  std::weak_ptr<Channel> self_;
};

// The channel ids JS holds and the notices due, per process (one JS thread uses the engines).
struct ChannelRegistry {
  struct Entry {
    std::shared_ptr<Channel> channel;
    bool taken[2] = {false, false};
  };
  std::unordered_map<uint32_t, Entry> open;
  uint32_t next = 0;
  std::vector<std::pair<std::shared_ptr<Channel>, int>> notices;
  // Run after each batch of notices (an engine that coalesces what its sides did in one batch).
  std::vector<void (*)()> afterBatch;
  uv_idle_t* idle = nullptr;
  uv_check_t* check = nullptr;
  uint64_t live = 0;  // channels not yet freed (either side still holds one)
  uint64_t made = 0;  // channels made since the process started
};

ChannelRegistry& Channels();

// A JS argument that may name a channel ({channel: id}): its `side`, taken now; nullptr when the
// argument is something else (an fd). Throws when the id is unknown or that side was taken.
std::shared_ptr<Channel> ChannelArg(const Napi::Value& v, int side, const char* who);
void InitChannel(Napi::Env env, Napi::Object exports);

}  // namespace nodemesh
