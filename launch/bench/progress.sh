# The long scripts' progress (launch/scale-study, launch/seed-bench/run), the shell twin of
# progress.h: one line on stderr per finished unit of work with done/total, rate and ETA (a text
# bar too when stderr is a terminal). Between two lines the kvfabric-bench runs draw their own.
# The clock ($SECONDS) is for display only. Source it, then:
#   kvf_progress_start LABEL TOTAL UNIT     (KVF_PROGRESS_QUIET=1 silences everything)
#   kvf_progress_update DONE [DETAIL]

kvf_progress_start() {
  kvf_progress_label="$1" kvf_progress_total="$2" kvf_progress_unit="$3"
  kvf_progress_started=$SECONDS
}

kvf_progress_update() {
  [ "${KVF_PROGRESS_QUIET:-0}" = 1 ] && return 0
  local done="$1" detail="${2:-}"
  local elapsed=$(( SECONDS - kvf_progress_started ))
  local line
  line=$(awk -v done="$done" -v total="$kvf_progress_total" -v elapsed="$elapsed" \
             -v unit="$kvf_progress_unit" -v label="$kvf_progress_label" -v detail="$detail" \
             -v bar="$([ -t 2 ] && echo 1 || echo 0)" '
    function num(v) { return v >= 1e6 ? sprintf("%.2fM", v / 1e6) : v >= 1e3 ? sprintf("%.1fk", v / 1e3) : v >= 10 ? sprintf("%.0f", v) : sprintf("%.2f", v) }
    function dur(s) { s = int(s + 0.5); return s < 60 ? s "s" : s < 3600 ? sprintf("%dm%02ds", s / 60, s % 60) : sprintf("%dh%02dm", s / 3600, s % 3600 / 60) }
    BEGIN {
      frac = total > 0 ? done / total : 1; if (frac > 1) frac = 1
      rate = elapsed > 0 ? done / elapsed : 0
      eta = done >= total ? "took " dur(elapsed) : rate > 0 ? "ETA " dur((total - done) / rate) : "ETA ?"
      out = sprintf("[%s] ", label)
      if (bar) { n = int(frac * 24 + 0.5); b = ""; for (i = 0; i < 24; i++) b = b (i < n ? "#" : "."); out = out "[" b "] " }
      out = out sprintf("%.1f%% (%s/%s %s), %s %s/s, %s%s", 100 * frac, done, total, unit, num(rate), unit, done >= total ? "" : "elapsed " dur(elapsed) ", ", eta)
      if (detail != "") out = out ", " detail
      print out
    }')
  echo "$line" >&2
}
