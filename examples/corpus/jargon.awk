# jargon.awk: the Jargon File's plain text marks cross references as {entry} (an entry name
# may wrap onto the next line; a few are doubled, {{entry}}); this drops those braces and
# keeps braces in code ("{code;}", "main(){...}", "{ }"), which hold a ";" or "=" or start
# with a blank. Records are paragraphs (RS = ""), printed with one blank line between them.
BEGIN { RS = "" }
{ print unbrace(unbrace($0)) "\n" }

function unbrace(s,   r, m, nl) {
  r = ""
  while (match(s, /\{[^{};= \n][^{};=]*\}/)) {
    m = substr(s, RSTART + 1, RLENGTH - 2)
    nl = gsub(/\n/, "\n", m)
    if (RLENGTH <= 80 && nl <= 1) { r = r substr(s, 1, RSTART - 1) m; s = substr(s, RSTART + RLENGTH) }
    else { r = r substr(s, 1, RSTART); s = substr(s, RSTART + 1) }   # not a reference: keep "{"
  }
  return r s
}
