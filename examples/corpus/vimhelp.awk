# vimhelp.awk: Vim help files -> plain text (mawk/gawk; run with LC_ALL=C).
# Per file: the first line (*usr_NN.txt*  For Vim version ...  Last change: ...) and the
# modeline are dropped; a section tag at the start of a line (*02.1*) keeps its text,
# other *tags* go; |links| lose their bars; the example markers (a trailing ">" that opens
# an example, a "<" in column 1 that closes one) and the heading marker (a trailing "~")
# go. The "Next chapter / Previous chapter / Table of contents" navigation is dropped.
FNR == 1 { next }
/^(     Next chapter|Next chapter| Previous chapter|Table of contents): \|/ { next }
{
  line = $0
  sub(/[ \t]+vim:[a-z]+[:=][^ ]*:[ \t]*$/, "", line)          # modeline
  sub(/[ \t]+vim:[a-z]+[:=][^ ]*$/, "", line)
  if (match(line, /^\*[0-9][0-9]\.[0-9]+\*/)) line = substr(line, 2, RLENGTH - 2) substr(line, RLENGTH + 1)
  line = tags(line)
  line = links(line)
  if (line ~ /(^| )>$/) sub(/ ?>$/, "", line)
  if (line ~ /^</) line = substr(line, 2)
  if (line ~ /[^ \t] ~$/) sub(/ ~$/, "", line)
  print line
}

# *tag* anchors: a "*" after start or blank, no blanks inside, then "*" before end or blank.
function tags(s,   r, pre, post) {
  r = ""
  while (match(s, /(^|[ \t])\*[^ \t*|]+\*([ \t]|$)/)) {
    pre = substr(s, RSTART, 1); if (pre == "*") pre = ""
    post = substr(s, RSTART + RLENGTH - 1, 1); if (post == "*") post = ""
    r = r substr(s, 1, RSTART - 1) pre
    s = post substr(s, RSTART + RLENGTH)
  }
  return r s
}

function links(s,   r) {
  r = ""
  while (match(s, /\|[^ \t|]+\|/)) {
    r = r substr(s, 1, RSTART - 1) substr(s, RSTART + 1, RLENGTH - 2)
    s = substr(s, RSTART + RLENGTH)
  }
  return r s
}
