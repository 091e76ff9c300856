#!/usr/bin/env bash
# Build the long-document corpus for the LongMem demo from Debian 12 (bookworm) packages.
#
#   bash examples/corpus/prepare.sh OUTDIR
#
# Installs the Debian packages it reads with apt-get when they are missing (as root, or
# through sudo), converts their long texts to plain UTF-8 text, and writes one file per
# document into OUTDIR plus OUTDIR/manifest.tsv (file, split, package, title, bytes,
# licence). The document list and its train/valid/test split are fixed below; the same
# package versions give byte-identical output. An OUTDIR from an earlier run is replaced;
# any other non-empty OUTDIR is refused. See examples/corpus/README.md.
set -euo pipefail
export LC_ALL=C
umask 022

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}
die() {
  echo "prepare.sh: error: $*" >&2
  exit 1
}
say() { printf '== %s\n' "$*"; }

if [ $# -ne 1 ] || [ -z "$1" ]; then
  echo "prepare.sh: error: give the output folder (OUTDIR) as the one argument" >&2
  usage
fi
out=$1
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
for f in info.awk pod.awk vimhelp.awk kjv.awk jargon.awk normalize.awk; do
  [ -r "$here/$f" ] || die "missing $here/$f"
done
if [ -e "$out" ] && [ ! -d "$out" ]; then die "$out exists and is not a folder"; fi
if [ -d "$out" ] && [ -n "$(ls -A "$out")" ] && [ ! -f "$out/manifest.tsv" ]; then
  die "$out is not empty and holds no manifest.tsv from an earlier run; give a new or empty folder"
fi
if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
  die "this needs a Debian system (dpkg-query and apt-get); it was written for Debian 12 (bookworm)"
fi
start=$(date +%s)

# --- packages -------------------------------------------------------------------------------
# Versions the recorded checksums were made with (Debian 12 as of 2025-05, with security
# updates). Other versions work but may give other bytes; a warning says so.
tested=(bible-kjv=4.38 bible-kjv-text=4.38 perl-doc=5.36.0-7+deb12u4 python3.11-doc=3.11.2-6+deb12u9
  vim-runtime=2:9.0.1378-2+deb12u2 jargon-text=4.4.7-4.1 dict-devil=1.0-13.1 debian-policy=4.6.2.0
  developers-reference=12.18 debian-faq=11.1 maint-guide=1.2.53 debian-reference-en=2.100
  bash-doc=5.2.15-2 gnu-standards=2022.03.23-0.1 r-doc-info=4.2.2.20221110-2)
packages=(bible-kjv perl-doc python3.11-doc vim-runtime jargon-text debian-policy developers-reference
  debian-faq maint-guide debian-reference-en bash-doc gnu-standards r-doc-info)
# dict-devil depends on a dictionary server (dictd) that would be installed and started for
# one data file: its .deb is fetched with apt-get download and unpacked instead (cached).

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
version() { dpkg-query -W -f='${Version}' "$1" 2>/dev/null; }

noroot=0
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null; then
  sudo=(sudo)
else
  sudo=(false)
  noroot=1
fi
updated=0
apt_update() {
  [ $updated -eq 0 ] || return 0
  updated=1
  "${sudo[@]}" apt-get update -qq || die "apt-get update failed (no network, or no root/sudo?)"
}

missing=()
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  [ $noroot -eq 0 ] || die "missing packages (${missing[*]}); run as root or install sudo"
  say "installing with apt-get: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_update
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" ||
    die "apt-get could not install: ${missing[*]}"
  for p in "${missing[@]}"; do installed "$p" || die "package $p is still not installed"; done
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/longmem-corpus
apt_log=$tmp/apt.log

# cached PKG [VERSION]: the newest cached .deb of PKG (of that version: apt names files
# NAME_VERSION_ARCH.deb, an epoch "E:" written "E%3a").
cached() {
  # shellcheck disable=SC2012 # apt names the files: no odd characters
  ls "$cache/${1}_"*"${2#*:}_"*.deb 2>/dev/null | sort | tail -n 1 || true
}
# deb PKG [VERSION]: the path of PKG's .deb in the cache, downloading it when absent.
deb() {
  local pkg=$1 ver=${2:-} f
  mkdir -p "$cache"
  f=$(cached "$pkg" "$ver")
  if [ -z "$f" ]; then
    if ! (cd "$cache" && apt-get download "$pkg${ver:+=$ver}") >"$apt_log" 2>&1; then
      apt_update
      (cd "$cache" && apt-get download "$pkg${ver:+=$ver}") >"$apt_log" 2>&1 ||
        { cat "$apt_log" >&2; die "apt-get download $pkg failed"; }
    fi
    f=$(cached "$pkg" "$ver")
    [ -n "$f" ] || die "apt-get download $pkg left no .deb in $cache"
  fi
  echo "$f"
}
# unpacked PKG: a folder holding PKG's files as its .deb has them (for fetched packages, and
# for installed ones whose documentation dpkg left out through a path-exclude setting).
unpacked() {
  local pkg=$1 d=$tmp/unpacked/$1 f ver=""
  if [ ! -d "$d" ]; then
    installed "$pkg" && ver=$(version "$pkg")
    f=$(deb "$pkg" "$ver")
    mkdir -p "$d"
    dpkg-deb -x "$f" "$d" || die "could not unpack $f"
  fi
  echo "$d"
}
# src PKG PATH: where to read PATH (as PKG installs it) from.
src() {
  local pkg=$1 rel=${2#/} d
  if installed "$pkg" && [ -e "/$rel" ]; then echo "/$rel"; return; fi
  d=$(unpacked "$pkg")
  [ -e "$d/$rel" ] || die "$pkg ($(version "$pkg")) has no /$rel"
  echo "$d/$rel"
}

vers=()
for p in "${packages[@]}" bible-kjv-text; do vers+=("$p=$(version "$p")"); done
devil_deb=""
if installed dict-devil; then vers+=("dict-devil=$(version dict-devil)"); else
  devil_deb=$(deb dict-devil)
  vers+=("dict-devil=$(dpkg-deb -f "$devil_deb" Version)")
fi
for v in "${vers[@]}"; do
  case " ${tested[*]} " in
    *" $v "*) ;;
    *) echo "prepare.sh: warning: $v differs from the tested version; the output may differ from the recorded checksums" >&2 ;;
  esac
done
say "packages: ${vers[*]}"

# --- the documents --------------------------------------------------------------------------
# file | split | package | licence | title | how | what
L_PD="public-domain"
L_PERL="GPL-1.0-or-later OR Artistic-1.0-Perl"
L_PSF="PSF-2.0"
L_OPL="OPUBL-1.0 (Open Publication License v1.0, no options)"
L_GPL2="GPL-2.0-or-later"
L_GFDL="GFDL-1.3-no-invariants-or-later"
L_NOTICE="permissive notice (verbatim and modified copies under the same notice)"
docs=$(cat <<EOF
kjv-01-genesis.txt|train|bible-kjv-text|$L_PD|King James Bible: Genesis|kjv|Genesis
kjv-02-exodus.txt|train|bible-kjv-text|$L_PD|King James Bible: Exodus|kjv|Exodus
kjv-03-leviticus.txt|train|bible-kjv-text|$L_PD|King James Bible: Leviticus|kjv|Leviticus
kjv-04-numbers.txt|train|bible-kjv-text|$L_PD|King James Bible: Numbers|kjv|Numbers
kjv-05-deuteronomy.txt|train|bible-kjv-text|$L_PD|King James Bible: Deuteronomy|kjv|Deuteronomy
kjv-06-joshua.txt|train|bible-kjv-text|$L_PD|King James Bible: Joshua|kjv|Joshua
kjv-07-judges-ruth.txt|train|bible-kjv-text|$L_PD|King James Bible: Judges, Ruth|kjv|Judges;Ruth
kjv-08-1samuel.txt|train|bible-kjv-text|$L_PD|King James Bible: 1 Samuel|kjv|1 Samuel
kjv-09-2samuel.txt|train|bible-kjv-text|$L_PD|King James Bible: 2 Samuel|kjv|2 Samuel
kjv-10-1kings.txt|train|bible-kjv-text|$L_PD|King James Bible: 1 Kings|kjv|1 Kings
kjv-11-2kings.txt|train|bible-kjv-text|$L_PD|King James Bible: 2 Kings|kjv|2 Kings
kjv-12-1chronicles.txt|train|bible-kjv-text|$L_PD|King James Bible: 1 Chronicles|kjv|1 Chronicles
kjv-13-2chronicles.txt|train|bible-kjv-text|$L_PD|King James Bible: 2 Chronicles|kjv|2 Chronicles
kjv-14-ezra-esther.txt|train|bible-kjv-text|$L_PD|King James Bible: Ezra, Nehemiah, Esther|kjv|Ezra;Nehemiah;Esther
kjv-15-job.txt|train|bible-kjv-text|$L_PD|King James Bible: Job|kjv|Job
kjv-16-psalms.txt|train|bible-kjv-text|$L_PD|King James Bible: Psalms|kjv|Psalms
kjv-17-proverbs-song.txt|train|bible-kjv-text|$L_PD|King James Bible: Proverbs, Ecclesiastes, Song of Solomon|kjv|Proverbs;Ecclesiastes;Song of Solomon
kjv-18-isaiah.txt|valid|bible-kjv-text|$L_PD|King James Bible: Isaiah|kjv|Isaiah
kjv-19-jeremiah-lamentations.txt|test|bible-kjv-text|$L_PD|King James Bible: Jeremiah, Lamentations|kjv|Jeremiah;Lamentations
kjv-20-ezekiel.txt|train|bible-kjv-text|$L_PD|King James Bible: Ezekiel|kjv|Ezekiel
kjv-21-daniel-prophets.txt|train|bible-kjv-text|$L_PD|King James Bible: Daniel and the twelve minor prophets|kjv|Daniel;Hosea;Joel;Amos;Obadiah;Jonah;Micah;Nahum;Habakkuk;Zephaniah;Haggai;Zechariah;Malachi
kjv-22-matthew.txt|train|bible-kjv-text|$L_PD|King James Bible: Matthew|kjv|Matthew
kjv-23-mark.txt|train|bible-kjv-text|$L_PD|King James Bible: Mark|kjv|Mark
kjv-24-luke.txt|train|bible-kjv-text|$L_PD|King James Bible: Luke|kjv|Luke
kjv-25-john.txt|train|bible-kjv-text|$L_PD|King James Bible: John|kjv|John
kjv-26-acts.txt|train|bible-kjv-text|$L_PD|King James Bible: Acts|kjv|Acts
kjv-27-pauline-epistles.txt|train|bible-kjv-text|$L_PD|King James Bible: Romans to Philemon|kjv|Romans;1 Corinthians;2 Corinthians;Galatians;Ephesians;Philippians;Colossians;1 Thessalonians;2 Thessalonians;1 Timothy;2 Timothy;Titus;Philemon
kjv-28-hebrews-revelation.txt|train|bible-kjv-text|$L_PD|King James Bible: Hebrews to Revelation|kjv|Hebrews;James;1 Peter;2 Peter;1 John;2 John;3 John;Jude;Revelation
devils-dictionary.txt|test|dict-devil|$L_PD|Ambrose Bierce: The Devil's Dictionary|devil|usr/share/dictd/devil.dict.dz
jargon-file.txt|train|jargon-text|$L_PD|The Jargon File 4.4.7|jargon|usr/share/doc/jargon-text/jargon.txt.gz
perl-perlfunc.txt|test|perl-doc|$L_PERL|Perl: perlfunc, the builtin functions|pod|perlfunc
perl-language.txt|train|perl-doc|$L_PERL|Perl: syntax, data, operators, subroutines, variables|pod|perlsyn perldata perlop perlsub perlvar
perl-regex.txt|train|perl-doc|$L_PERL|Perl: regular expressions|pod|perlrequick perlretut perlre perlrecharclass perlrebackslash
perl-faq.txt|train|perl-doc|$L_PERL|Perl: the FAQ|pod|perlfaq perlfaq1 perlfaq2 perlfaq3 perlfaq4 perlfaq5 perlfaq6 perlfaq7 perlfaq8 perlfaq9
perl-data-modules-objects.txt|train|perl-doc|$L_PERL|Perl: references, data structures, modules, objects|pod|perlreftut perlref perldsc perllol perlmod perlobj perlootut perltie perlpacktut
perl-unicode-locale.txt|train|perl-doc|$L_PERL|Perl: Unicode and locales|pod|perluniintro perlunicode perlunicook perllocale
perl-system.txt|train|perl-doc|$L_PERL|Perl: running, IPC, portability, security, threads, debugging, performance|pod|perlrun perlipc perlport perlsec perlthrtut perldebtut perldebug perlperf
perl-internals.txt|train|perl-doc|$L_PERL|Perl: internals, XS and embedding|pod|perlguts perlcall perlxs perlxstut perlembed perlinterp perlhacktips perlhack
perl-glossary.txt|train|perl-doc|$L_PERL|Perl: glossary|pod|perlglossary
python-tutorial.txt|train|python3.11-doc|$L_PSF|Python 3.11: The Python Tutorial|python|The Python Tutorial
python-setup-usage.txt|train|python3.11-doc|$L_PSF|Python 3.11: Python Setup and Usage|python|Python Setup and Usage
python-language-reference.txt|test|python3.11-doc|$L_PSF|Python 3.11: The Python Language Reference|python|The Python Language Reference
python-howtos.txt|train|python3.11-doc|$L_PSF|Python 3.11: Python HOWTOs|python|Python HOWTOs
python-faq.txt|valid|python3.11-doc|$L_PSF|Python 3.11: Python Frequently Asked Questions|python|Python Frequently Asked Questions
python-extending-embedding.txt|train|python3.11-doc|$L_PSF|Python 3.11: Extending and Embedding the Python Interpreter|python|Extending and Embedding the Python Interpreter
python-glossary.txt|train|python3.11-doc|$L_PSF|Python 3.11: Glossary|python|Glossary
python-history-license.txt|train|python3.11-doc|$L_PSF|Python 3.11: History and License|python|History and License
vim-user-manual-1.txt|train|vim-runtime|$L_OPL|Vim 9.0 user manual: Getting Started (usr_01-usr_12)|vim|usr_01 usr_02 usr_03 usr_04 usr_05 usr_06 usr_07 usr_08 usr_09 usr_10 usr_11 usr_12
vim-user-manual-2.txt|valid|vim-runtime|$L_OPL|Vim 9.0 user manual: Editing Effectively, Tuning Vim, Making Vim Run (usr_20-usr_90)|vim|usr_20 usr_21 usr_22 usr_23 usr_24 usr_25 usr_26 usr_27 usr_28 usr_29 usr_30 usr_31 usr_32 usr_40 usr_41 usr_42 usr_43 usr_44 usr_45 usr_50 usr_51 usr_52 usr_90
debian-policy.txt|train|debian-policy|$L_GPL2|Debian Policy Manual 4.6.2.0|text|usr/share/doc/debian-policy/policy.txt.gz
debian-developers-reference.txt|valid|developers-reference|$L_GPL2|Debian Developer's Reference|text|usr/share/developers-reference/developers-reference.txt.gz
debian-faq.txt|train|debian-faq|$L_NOTICE|The Debian GNU/Linux FAQ|text|usr/share/doc/debian/FAQ/debian-faq.en.txt.gz
debian-maint-guide.txt|train|maint-guide|$L_GPL2|Debian New Maintainers' Guide|text|usr/share/doc/maint-guide/maint-guide.en.txt.gz
debian-reference.txt|train|debian-reference-en|$L_GPL2|Debian Reference|text|usr/share/debian-reference/debian-reference.en.txt.gz
gnu-bash-manual.txt|train|bash-doc|$L_GFDL|GNU Bash Reference Manual|info|usr/share/info/bash.info.gz
gnu-coding-standards.txt|train|gnu-standards|$L_GFDL|GNU Coding Standards|info|usr/share/info/standards.info.gz
gnu-maintainers.txt|train|gnu-standards|$L_GFDL|Information for Maintainers of GNU Software|info|usr/share/info/maintain.info.gz
r-intro.txt|train|r-doc-info|$L_NOTICE|An Introduction to R|info|usr/share/info/R-intro.info.gz
r-language-definition.txt|train|r-doc-info|$L_NOTICE|R Language Definition|info|usr/share/info/R-lang.info.gz
EOF
)

raw=$tmp/raw
mkdir -p "$raw" "$tmp/out"

# King James Bible: the whole text once through bible(1), then one file per book group.
say "extracting the documents"
command -v bible >/dev/null || die "bible (from bible-kjv) is not on PATH"
echo "$docs" | awk -F'|' '$6 == "kjv" { n = split($7, b, ";"); for (i = 1; i <= n; i++) print b[i] "\t" $1 }' >"$tmp/kjv.map"
bible -l1000 gen1:1-rev22:21 >"$tmp/kjv.txt" || die "bible(1) failed"
awk -v map="$tmp/kjv.map" -v dir="$raw" -f "$here/kjv.awk" "$tmp/kjv.txt" || die "splitting the Bible failed"

# Python: the chosen top-level chapters of the one big Info manual, in one pass.
echo "$docs" | awk -F'|' -v d="$raw" '$6 == "python" { print $7 "\t" d "/" $1 }' >"$tmp/python.map"
f=$(src python3.11-doc usr/share/info/python3.11.info.gz)
gzip -dc "$f" | tr -d '\000' >"$tmp/python.info"
awk -v see=0 -v chapters="$tmp/python.map" -f "$here/info.awk" "$tmp/python.info"

perlfunc=$(dpkg-query -L perl-doc | awk '/\/pod\/perlfunc\.pod$/ { p = $0 } END { print p }')
perl_pods=$(src perl-doc "${perlfunc:-usr/share/perl/5.36.0/pod/perlfunc.pod}")
perl_pods=${perl_pods%/perlfunc.pod}
vimdoc=$(src vim-runtime usr/share/vim/vim90/doc/usr_01.txt)
vimdoc=${vimdoc%/usr_01.txt}

while IFS='|' read -r file split pkg lic title how what; do
  dst=$raw/$file
  case $how in
    kjv | python) ;;
    text)
      f=$(src "$pkg" "$what")
      gzip -dcf "$f" >"$dst"
      ;;
    jargon) # the Jargon File marks cross references as {entry}
      f=$(src "$pkg" "$what")
      gzip -dc "$f" | awk -f "$here/jargon.awk" >"$dst"
      ;;
    devil) # dictd database: skip its header entries and the alphabet entry; _italics_ lose the marks
      if [ -n "$devil_deb" ]; then f=$(unpacked "$pkg")/$what; else f=$(src "$pkg" "$what"); fi
      gzip -dc "$f" | awk '/Internet Wiretap 1st Online Edition/ { on = 1 } on && !/^ abcdefghijklmnopqrstuvwxyz$/ { gsub(/_/, ""); print }' >"$dst"
      ;;
    info)
      f=$(src "$pkg" "$what")
      gzip -dc "$f" | tr -d '\000' >"$tmp/one.info"
      parts=("$tmp/one.info")
      n=1
      while f2=${f%.gz}; f2=${f2%.info}.info-$n.gz; [ -e "$f2" ]; do
        gzip -dc "$f2" | tr -d '\000' >"$tmp/one.info-$n"
        parts+=("$tmp/one.info-$n")
        n=$((n + 1))
      done
      awk -f "$here/info.awk" "${parts[@]}" >"$dst"
      ;;
    pod)
      for p in $what; do
        [ -r "$perl_pods/$p.pod" ] || die "perl-doc has no $p.pod in $perl_pods"
        sed 's/^[[:space:]]*$//' "$perl_pods/$p.pod" | awk -f "$here/pod.awk"
      done >"$dst"
      ;;
    vim)
      {
        echo "[Plain-text conversion of part of the Vim user manual (runtime/doc/usr_*.txt of Vim 9.0,"
        echo "Debian package vim-runtime). Copyright (c) 1988-2003 Bram Moolenaar; distributed under"
        echo "the Open Publication License v1.0 or later. Modified: help-file markup removed.]"
        echo
        for p in $what; do
          [ -r "$vimdoc/$p.txt" ] || die "vim-runtime has no $p.txt in $vimdoc"
          awk -f "$here/vimhelp.awk" "$vimdoc/$p.txt"
          echo
        done
      } >"$dst"
      ;;
    *) die "unknown kind $how for $file" ;;
  esac
done <<<"$docs"

# --- normalise, check, manifest ---------------------------------------------------------------
manifest=$tmp/out/manifest.tsv
printf 'file\tsplit\tpackage\ttitle\tbytes\tlicence\n' >"$manifest"
have_iconv=0
command -v iconv >/dev/null && have_iconv=1
while IFS='|' read -r file split pkg lic title how what; do
  [ -s "$raw/$file" ] || die "$file came out empty"
  awk -f "$here/normalize.awk" "$raw/$file" >"$tmp/out/$file"
  bytes=$(wc -c <"$tmp/out/$file")
  [ "$bytes" -ge 20000 ] || die "$file is only $bytes bytes: the extraction went wrong"
  if [ $have_iconv -eq 1 ] && ! iconv -f UTF-8 -t UTF-8 "$tmp/out/$file" >/dev/null 2>&1; then
    die "$file is not valid UTF-8"
  fi
  case $split in train | valid | test) ;; *) die "bad split $split for $file" ;; esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$file" "$split" "$pkg" "$title" "$bytes" "$lic" >>"$manifest"
done <<<"$docs"

# Replace an earlier run's files, then move the new ones in.
mkdir -p "$out"
if [ -f "$out/manifest.tsv" ]; then
  tail -n +2 "$out/manifest.tsv" | cut -f 1 | while IFS= read -r f; do
    case $f in */* | "" | .*) ;; *) rm -f -- "$out/$f" ;; esac
  done
  rm -f -- "$out/manifest.tsv"
fi
[ -z "$(ls -A "$out")" ] || die "$out holds files that are not from an earlier run of prepare.sh"
mv "$tmp/out/"* "$out/"

awk -F'\t' 'NR > 1 { n[$2]++; b[$2] += $5; if ($5 > m[$2]) m[$2] = $5 }
  END { for (s in n) printf "%-5s %3d documents %10d bytes (largest %d)\n", s, n[s], b[s], m[s] }' "$out/manifest.tsv" | sort -r
say "wrote $out ($(($(date +%s) - start)) s); manifest sha256 $(sha256sum "$out/manifest.tsv" | cut -d' ' -f1)"
