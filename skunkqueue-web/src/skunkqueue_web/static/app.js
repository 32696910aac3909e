// skunq web: live updates without reloading the page.
// Polls the page's own address with fragment=1 while the tab is visible and
// swaps the #live region; stops while hidden, and skips while the user is
// choosing rows, typing or reading an unfolded traceback inside it, so nothing
// they are doing is thrown away.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var dot = document.getElementById("live-state");
  var timer = null;
  var busy = false;

  function userIsWorking() {
    if (!live) return false;
    if (live.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return true;
    // An open traceback of the job's history: a swap would fold it while it is being read.
    return live.querySelector("input[type=checkbox]:checked, details[open]") !== null;
  }

  function setState(name) {
    if (dot) { dot.className = "live-dot " + name; dot.textContent = name === "off" ? "paused" : "live"; }
  }

  function schedule(delay) {
    if (timer) clearTimeout(timer);
    timer = setTimeout(tick, delay);
  }

  function every() { return parseInt(live.dataset.every, 10) || 2000; }

  // A page the store is slow to answer (a large queue on a store that scans) is asked
  // again only after four times as long as its last answer took, so watching it never
  // keeps the store busy.
  function tick() {
    timer = null;
    if (!live || !live.dataset.src || busy || document.hidden) return;
    if (userIsWorking()) { setState("off"); schedule(every()); return; }
    busy = true;
    var started = Date.now();
    fetch(live.dataset.src, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (!r.ok) throw new Error(r.status);
        return r.text();
      })
      .then(function (html) { if (!userIsWorking()) live.innerHTML = html; setState("on"); })
      .catch(function () { setState("error"); })
      .then(function () {
        busy = false;
        if (!document.hidden) schedule(Math.max(every(), 4 * (Date.now() - started)));
      });
  }

  function start() { if (!timer && !busy && live && live.dataset.src) schedule(every()); }

  function stop() { if (timer) { clearTimeout(timer); timer = null; } setState("off"); }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { stop(); } else { setState("on"); tick(); }
  });
  if (!document.hidden) { setState("on"); start(); }

  // Confirmation for destructive forms and every bulk action, naming what it acts on
  // (the server checks the token and CSRF value regardless).
  document.addEventListener("submit", function (e) {
    var form = e.target;
    var ask = form.getAttribute("data-confirm");
    var scope = form.querySelector("select[name=scope]");
    var verb = e.submitter && e.submitter.getAttribute("data-verb");
    if (!ask && scope && verb) {
      var what = scope.value === "matching" ? form.getAttribute("data-confirm-matching")
        : document.querySelectorAll("input[name=ids]:checked").length + " selected dead letter(s)";
      ask = verb + " " + what + "?";
    }
    if (ask && !window.confirm(ask)) e.preventDefault();
  });

  // "Select all" boxes on the dead-letter list.
  document.addEventListener("change", function (e) {
    var box = e.target;
    if (!box.dataset || !box.dataset.all) return;
    document.querySelectorAll("input[name=" + box.dataset.all + "]").forEach(function (b) { b.checked = box.checked; });
  });
})();
