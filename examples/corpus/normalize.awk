# normalize.awk: the last pass over every document (mawk/gawk; run with LC_ALL=C).
# Drops carriage returns, form feeds and other control characters but tab; writes common
# typographic UTF-8 as ASCII (quotes, dashes, ellipsis, bullets, no-break space, arrows,
# box drawing) and keeps every other UTF-8 character as it is; strips trailing blanks;
# collapses each run of blank lines into one; no blank lines at the start or the end.
{
  line = $0
  gsub(/[\001-\010\013-\037\177]/, "", line)
  gsub(/\342\200[\230\231\232\233\262]/, "'", line)           # ‘ ’ ‚ ‛ ′
  gsub(/\342\200[\234\235\236\237\263]/, "\"", line)          # “ ” „ ‟ ″
  gsub(/\342\200[\220\221\222\223]|\342\210\222/, "-", line)  # ‐ ‑ ‒ – −
  gsub(/\342\200[\224\225]/, "--", line)                      # — ―
  gsub(/\342\200\246/, "...", line)                           # …
  gsub(/\342\200\242|\342\227\217/, "*", line)                # • ●
  gsub(/\302\240|\342\200[\202\203\211\257]/, " ", line)      # no-break and fixed-width spaces
  gsub(/\342\200[\213\214\215]|\357\273\277|\302\255/, "", line)  # zero-width, BOM, soft hyphen
  gsub(/\342\206\222/, "->", line); gsub(/\342\206\220/, "<-", line); gsub(/\342\206\224/, "<->", line)
  gsub(/\342\207\222/, "=>", line); gsub(/\342\207\224/, "<=>", line)
  gsub(/\342\224[\200\201]/, "-", line)                       # ─ ━
  gsub(/\342\224[\202\203]/, "|", line)                       # │ ┃
  gsub(/\342\225\220/, "=", line); gsub(/\342\225\221/, "|", line)  # ═ ║ (before the range below)
  gsub(/\342\224[\214-\277]|\342\225[\200-\254]/, "+", line)  # corners, tees, crosses
  sub(/[ \t]+$/, "", line)
  if (line == "") { if (printed) blank = 1; next }
  if (blank) print ""
  print line
  printed = 1; blank = 0
}
