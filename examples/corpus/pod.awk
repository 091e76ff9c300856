# pod.awk: Perl POD -> plain text (mawk/gawk; run with LC_ALL=C). A small subset of what
# pod2text does, enough for the core Perl documentation:
#  - =head1..=head4 become plain heading lines; =item lines are printed as they read
#    ("=item *" and "=item 1." become "* " and "1. " before the next paragraph);
#    =over/=back indent the list bodies by 4 spaces per level;
#  - verbatim paragraphs are kept as they are (indented with the list they sit in);
#  - formatting codes: B I C F S give their text, X Z give nothing, E<..> gives the
#    character (UTF-8), L<text|target> gives text, L<name/"sec"> gives "sec" in name;
#    the C<< ... >> forms with several angle brackets are understood;
#  - =begin/=end blocks, =for paragraphs, =encoding and text outside =pod .. =cut are
#    dropped.
# Input must have whitespace-only lines emptied (sed 's/^[[:space:]]*$//'); records are
# paragraphs. Several files may be given: each starts outside POD until its first command.
BEGIN {
  RS = ""
  split("lt < gt > verbar | sol / quot \" amp & apos '", e)
  for (i = 1; i in e; i += 2) ent[e[i]] = e[i + 1]
  split("nbsp 160 shy 173 copy 169 reg 174 micro 181 laquo 171 raquo 187 " \
        "AElig 198 aelig 230 Aring 197 aring 229 auml 228 Auml 196 ouml 246 Ouml 214 " \
        "uuml 252 Uuml 220 euml 235 Euml 203 eacute 233 Eacute 201 egrave 232 ecirc 234 " \
        "aacute 225 agrave 224 acirc 226 iacute 237 icirc 238 iuml 239 oacute 243 " \
        "ocirc 244 oslash 248 Oslash 216 szlig 223 eth 240 ETH 208 thorn 254 yuml 255 " \
        "ntilde 241 ccedil 231 euro 8364 zwnj 8204 zwj 8205 mdash 8212 ndash 8211", e)
  for (i = 1; i in e; i += 2) ent[e[i]] = utf8(e[i + 1] + 0)
}

FNR == 1 { inpod = 0; level = 0; skipblock = ""; pending = "" }

/^=/ {
  cmd = $1; sub(/^=/, "", cmd)
  text = $0; sub(/^=[A-Za-z0-9]+[ \t\n]*/, "", text)
  if (skipblock != "") {
    if (cmd == "end" && text ~ ("^" skipblock)) skipblock = ""
    next
  }
  inpod = (cmd != "cut")
  if (cmd ~ /^head[1-4]$/) { gsub(/\n/, " ", text); out(fmt(text), ""); next }
  if (cmd == "over") { level++; next }
  if (cmd == "back") { if (level > 0) level--; pending = ""; next }
  if (cmd == "item") {
    gsub(/\n/, " ", text)
    if (text == "*" || text == "") { pending = "* "; next }
    if (text ~ /^[0-9]+\.?$/) { sub(/\.$/, "", text); pending = text ". "; next }
    if (text ~ /^\* /) { sub(/^\* /, "", text); out("* " fmt(text), indent(level - 1)); next }
    out(fmt(text), indent(level - 1)); next
  }
  if (cmd == "begin") { split(text, w, /[ \t\n]+/); if (w[1] !~ /^:?text$/) skipblock = w[1]; next }
  next                                                       # =for =encoding =pod =cut ...
}

{
  if (!inpod || skipblock != "") next
  if ($0 ~ /^[ \t]/) { out($0, indent(level)); next }       # verbatim
  out(fmt($0), indent(level))
}

function indent(n,   s) { s = ""; while (n-- > 0) s = s "    "; return s }

function out(s, ind,   n, i, lines, first) {
  n = split(s, lines, "\n")
  first = (pending != "" && level > 0) ? indent(level - 1) pending : ind
  if (pending != "" && level == 0) first = pending
  pending = ""
  printf "%s%s\n", first, lines[1]
  for (i = 2; i <= n; i++) printf "%s%s\n", (lines[i] == "" ? "" : ind), lines[i]
  printf "\n"
}

# ---- formatting codes -------------------------------------------------------------------
function fmt(s) {
  if (s !~ /[A-Z]</) return s
  S = s; P = 1; L = length(s)
  return seq(0)
}

# Text up to the end of the current code: ">" when k == 0, whitespace and k ">" otherwise.
function seq(k,   r, c, letter, n, closer, m, ws) {
  r = ""
  closer = ""; for (m = 0; m < k; m++) closer = closer ">"
  while (P <= L) {
    c = substr(S, P, 1)
    if (k == 0 && c == ">") { P++; return r }
    if (k > 0 && c ~ /[ \t\n]/) {
      ws = P; while (P <= L && substr(S, P, 1) ~ /[ \t\n]/) P++
      if (substr(S, P, k) == closer) { P += k; return r }
      r = r substr(S, ws, P - ws); continue
    }
    if (c ~ /[A-Z]/ && substr(S, P + 1, 1) == "<") {
      letter = c; P += 2; n = 1
      while (substr(S, P, 1) == "<") { n++; P++ }
      if (n > 1 && substr(S, P, 1) ~ /[ \t\n]/) {
        while (P <= L && substr(S, P, 1) ~ /[ \t\n]/) P++
        r = r code(letter, seq(n))
      } else {
        P -= n - 1                       # "C<<x" without a space: one "<" opens, the rest is text
        r = r code(letter, seq(0))
      }
      continue
    }
    r = r c; P++
  }
  return r
}

function code(letter, t,   bar, slash, name, sec) {
  if (letter == "X" || letter == "Z") return ""
  if (letter == "E") {
    if (t in ent) return ent[t]
    if (t ~ /^0[xX][0-9A-Fa-f]+$/) return utf8(hex(substr(t, 3)))
    if (t ~ /^0[0-7]*$/) return utf8(oct(t))
    if (t ~ /^[0-9]+$/) return utf8(t + 0)
    return "E<" t ">"
  }
  if (letter != "L") return t
  bar = index(t, "|")
  if (bar) return substr(t, 1, bar - 1)
  if (t ~ /^[A-Za-z][A-Za-z0-9+.-]*:[^ ]/) return t                  # a URL
  slash = index(t, "/")
  if (!slash) return t
  name = substr(t, 1, slash - 1); sec = substr(t, slash + 1)
  gsub(/^"|"$/, "", sec)
  return (name == "") ? "\"" sec "\"" : "\"" sec "\" in " name
}

function hex(s,   v, i) { v = 0; s = tolower(s); for (i = 1; i <= length(s); i++) v = v * 16 + index("0123456789abcdef", substr(s, i, 1)) - 1; return v }
function oct(s,   v, i) { v = 0; for (i = 1; i <= length(s); i++) v = v * 8 + substr(s, i, 1); return v }

function utf8(cp) {
  if (cp < 128) return sprintf("%c", cp)
  if (cp < 2048) return sprintf("%c%c", 192 + int(cp / 64), 128 + cp % 64)
  return sprintf("%c%c%c", 224 + int(cp / 4096), 128 + int(cp / 64) % 64, 128 + cp % 64)
}
