// megalm._bpe: GPT-2 byte-level BPE encoding for preprocessing, without torch (so tokenizer worker processes
// start in a fraction of a second).
//
// Same ids as GPT-2's encoder.py and the `tokenizers` library: text is split by GPT-2's pattern
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
// (hand-written here, no regex engine), each piece's UTF-8 bytes become byte tokens, and the adjacent pair with
// the lowest merge rank is merged until none is left. Pieces repeat (Zipf), so a cache bounded in entries and
// bytes maps a piece of up to 256 bytes straight to its ids. The Unicode letter/number test comes from Python's unicodedata through a callback,
// memoised per code point, so it agrees with the Python side without a table compiled in.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <functional>
#include <queue>
#include <stdexcept>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

enum Class : uint8_t { kOther = 0, kLetter = 1, kNumber = 2, kSpace = 3, kUnknown = 255 };

bool is_white_space(uint32_t c) {  // Unicode White_Space, which is what \s means in the GPT-2 pattern
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Decodes the code point at s[i] (valid UTF-8: Python produced it) and returns its byte length.
inline int decode(const unsigned char* s, size_t i, uint32_t* cp) {
  unsigned char b = s[i];
  if (b < 0x80) { *cp = b; return 1; }
  if (b < 0xE0) { *cp = ((b & 0x1F) << 6) | (s[i + 1] & 0x3F); return 2; }
  if (b < 0xF0) { *cp = ((b & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F); return 3; }
  *cp = ((b & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F);
  return 4;
}

class ByteBPE {
 public:
  ByteBPE(std::vector<int32_t> byte_ids, const std::vector<std::tuple<int32_t, int32_t, int32_t>>& merges,
          py::function letter_or_number, size_t cache_entries)
      : byte_ids_(std::move(byte_ids)), classify_(std::move(letter_or_number)), classes_(0x110000, kUnknown),
        cache_limit_(cache_entries) {
    if (byte_ids_.size() != 256) throw std::invalid_argument("ByteBPE: need one token id for each of 256 bytes");
    merges_.reserve(merges.size() * 2);
    int32_t rank = 0;
    for (const auto& [a, b, merged] : merges) merges_.emplace(key(a, b), std::make_pair(rank++, merged));
  }

  // All texts' ids concatenated (int32) and each text's count (int64).
  std::pair<py::array_t<int32_t>, py::array_t<int64_t>> encode_batch(const std::vector<py::str>& texts) {
    std::vector<int32_t> ids;
    py::array_t<int64_t> lengths(static_cast<py::ssize_t>(texts.size()));
    int64_t* len = lengths.mutable_data();
    for (size_t t = 0; t < texts.size(); ++t) {
      Py_ssize_t n = 0;
      const char* utf8 = PyUnicode_AsUTF8AndSize(texts[t].ptr(), &n);
      if (utf8 == nullptr) throw py::error_already_set();
      size_t before = ids.size();
      encode(reinterpret_cast<const unsigned char*>(utf8), static_cast<size_t>(n), &ids);
      len[t] = static_cast<int64_t>(ids.size() - before);
    }
    py::array_t<int32_t> out(static_cast<py::ssize_t>(ids.size()));
    std::copy(ids.begin(), ids.end(), out.mutable_data());
    return {out, lengths};
  }

  size_t cache_size() const { return cache_.size(); }

 private:
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }

  uint8_t cls(uint32_t cp) {
    uint8_t& c = classes_[cp];
    if (c == kUnknown) {
      if (is_white_space(cp)) c = kSpace;
      else c = static_cast<uint8_t>(classify_(cp).cast<int>());  // 0 other, 1 letter, 2 number
    }
    return c;
  }

  // Splits one text into pieces by the GPT-2 pattern and appends each piece's ids.
  void encode(const unsigned char* s, size_t n, std::vector<int32_t>* out) {
    size_t i = 0;
    uint32_t cp, next;
    while (i < n) {
      int w = decode(s, i, &cp);
      size_t end;
      if (cp == '\'' && i + 1 < n && (end = contraction(s, i, n)) != 0) {
        piece(s + i, end - i, out);
        i = end;
        continue;
      }
      size_t j = i;  // start of the run: after an optional leading space when a non-space follows
      uint8_t c = cls(cp);
      if (cp == ' ' && i + 1 < n) {
        decode(s, i + 1, &next);
        uint8_t nc = cls(next);
        if (nc != kSpace) { j = i + 1; c = nc; }
      }
      if (c != kSpace) {  // ` ?\p{L}+`, ` ?\p{N}+` or ` ?[^\s\p{L}\p{N}]+`: a run of one class
        end = j;
        while (end < n) {
          int k = decode(s, end, &next);
          if (cls(next) != c) break;
          end += k;
        }
        piece(s + i, end - i, out);
        i = end;
        continue;
      }
      // whitespace: the whole run, but leave its last character to a following non-space (`\s+(?!\S)|\s+`)
      end = i + w;
      size_t last = i;
      while (end < n) {
        int k = decode(s, end, &next);
        if (cls(next) != kSpace) break;
        last = end;
        end += k;
      }
      if (end < n && last > i) end = last;
      piece(s + i, end - i, out);
      i = end;
    }
  }

  // Length of 's 't 're 've 'm 'll 'd at s[i] (case-sensitive, as in GPT-2), else 0.
  static size_t contraction(const unsigned char* s, size_t i, size_t n) {
    unsigned char a = s[i + 1];
    if (a == 's' || a == 't' || a == 'm' || a == 'd') return i + 2;
    if (i + 2 < n) {
      unsigned char b = s[i + 2];
      if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l')) return i + 3;
    }
    return 0;
  }

  void piece(const unsigned char* p, size_t len, std::vector<int32_t>* out) {
    std::string_view view(reinterpret_cast<const char*>(p), len);
    auto hit = cache_.find(std::string(view));
    if (hit != cache_.end()) {
      out->insert(out->end(), hit->second.begin(), hit->second.end());
      return;
    }
    std::vector<int32_t> word(len);
    for (size_t k = 0; k < len; ++k) word[k] = byte_ids_[p[k]];
    merge(&word);
    out->insert(out->end(), word.begin(), word.end());
    if (len > kLongestCached) return;  // long pieces rarely repeat; caching them would only cost memory
    const size_t bytes = len + word.size() * sizeof(int32_t) + kEntryOverhead;
    if (cache_.size() >= cache_limit_ || cache_bytes_ + bytes > kCacheBytes) {  // bounded memory on any corpus
      cache_.clear();
      cache_bytes_ = 0;
    }
    cache_bytes_ += bytes;
    cache_.emplace(std::string(view), std::move(word));
  }

  // GPT-2's bpe(): repeatedly merge the lowest-ranked adjacent pair, the leftmost first among equals. A heap of
  // candidate pairs over a linked list of symbols keeps this O(n log n) in the piece's length: a piece can be a
  // whole megabyte (a DNA string, a minified file), where rescanning the word after every merge is quadratic.
  void merge(std::vector<int32_t>* word) const {
    std::vector<int32_t>& w = *word;
    const int n = static_cast<int>(w.size());
    if (n < 2) return;
    constexpr int32_t kDead = -1;
    std::vector<int> next(n);
    for (int i = 0; i < n; ++i) next[i] = i + 1 < n ? i + 1 : -1;
    std::vector<int> prev(n);
    for (int i = 0; i < n; ++i) prev[i] = i - 1;
    struct Candidate {
      int32_t rank, pos, left, right, merged;
      bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
    auto consider = [&](int pos) {
      if (pos < 0 || next[pos] < 0) return;
      auto it = merges_.find(key(w[pos], w[next[pos]]));
      if (it != merges_.end()) heap.push({it->second.first, pos, w[pos], w[next[pos]], it->second.second});
    };
    for (int i = 0; i + 1 < n; ++i) consider(i);
    while (!heap.empty()) {
      const Candidate c = heap.top();
      heap.pop();
      const int right = next[c.pos];
      if (w[c.pos] != c.left || right < 0 || w[right] != c.right) continue;  // stale: a neighbour has merged
      w[c.pos] = c.merged;
      w[right] = kDead;
      next[c.pos] = next[right];
      if (next[right] >= 0) prev[next[right]] = c.pos;
      consider(prev[c.pos]);
      consider(c.pos);
    }
    int out = 0;
    for (int i = 0; i >= 0; i = next[i]) w[out++] = w[i];
    w.resize(out);
  }

  std::vector<int32_t> byte_ids_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;
  py::function classify_;
  std::vector<uint8_t> classes_;
  static constexpr size_t kLongestCached = 256, kEntryOverhead = 96, kCacheBytes = size_t(64) << 20;
  std::unordered_map<std::string, std::vector<int32_t>> cache_;
  size_t cache_limit_, cache_bytes_ = 0;
};

}  // namespace

PYBIND11_MODULE(_bpe, m) {
  m.doc() = "GPT-2 byte-level BPE encoder for preprocessing (no torch dependency)";
  py::class_<ByteBPE>(m, "ByteBPE")
      .def(py::init<std::vector<int32_t>, const std::vector<std::tuple<int32_t, int32_t, int32_t>>&, py::function,
                    size_t>(),
           py::arg("byte_ids"), py::arg("merges"), py::arg("letter_or_number"), py::arg("cache_entries") = 262144)
      .def("encode_batch", &ByteBPE::encode_batch, py::arg("texts"))
      .def_property_readonly("cache_size", &ByteBPE::cache_size);
}
