# kjv.awk: split the output of `bible -l1000 gen1:1-rev22:21` (bible-kjv) into documents.
#   awk -v map=BOOKS.tsv -v dir=DIR -f kjv.awk
# BOOKS.tsv lines: "book name<TAB>file name"; each book goes to its file (several books may
# share one, in canonical order). Chapter headings ("Genesis 1") stay; verse lines keep
# their numbers, without the leading blanks.
BEGIN {
  while ((getline line < map) > 0) { t = index(line, "\t"); dest[substr(line, 1, t - 1)] = substr(line, t + 1) }
  close(map)
}
/^[^ ].* [0-9]+$/ {
  book = $0; sub(/ [0-9]+$/, "", book)
  if (!(book in dest)) { print "kjv.awk: book not in the map: " book > "/dev/stderr"; bad = 1; exit 1 }
  out = dir "/" dest[book]
  seen[book] = 1
}
out == "" { next }
{ line = $0; sub(/^ +/, "", line); print line > out }
END {
  if (bad) exit 1
  for (b in dest) if (!(b in seen)) { print "kjv.awk: book missing from the text: " b > "/dev/stderr"; exit 1 }
}
