// skunq web: live updates without reloading the page.
// Polls the page's own address with fragment=1 while the tab is visible and
// swaps the #live region; pauses while hidden, or while the user is choosing
// rows or typing inside it, so nothing they are doing is thrown away.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var dot = document.getElementById("live-state");
  var timer = null;
  var busy = false;

  function userIsWorking() {
    if (!live) return false;
    if (live.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return true;
    return live.querySelector("input[type=checkbox]:checked") !== null;
  }

  function setState(name) {
    if (dot) { dot.className = "live-dot " + name; dot.textContent = name === "off" ? "paused" : "live"; }
  }

  function tick() {
    if (!live || !live.dataset.src || busy) return;
    if (document.hidden || userIsWorking()) { setState("off"); return; }
    busy = true;
    fetch(live.dataset.src, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (!r.ok) throw new Error(r.status);
        return r.text();
      })
      .then(function (html) { if (!userIsWorking()) live.innerHTML = html; setState("on"); })
      .catch(function () { setState("error"); })
      .then(function () { busy = false; });
  }

  function start() {
    if (timer || !live || !live.dataset.src) return;
    timer = setInterval(tick, parseInt(live.dataset.every, 10) || 2000);
  }

  function stop() { if (timer) { clearInterval(timer); timer = null; } setState("off"); }

  document.addEventListener("visibilitychange", function () {
    if (document.hidden) { stop(); } else { tick(); start(); }
  });
  if (!document.hidden) { setState("on"); start(); }

  // Confirmation for destructive forms (the server checks the token and CSRF value regardless).
  document.addEventListener("submit", function (e) {
    var form = e.target;
    var ask = form.getAttribute("data-confirm");
    var scope = form.querySelector("select[name=scope]");
    if (!ask && scope && scope.value === "matching") ask = form.getAttribute("data-confirm-matching");
    if (ask && !window.confirm(ask)) e.preventDefault();
  });

  // "Select all" boxes on the dead-letter list.
  document.addEventListener("change", function (e) {
    var box = e.target;
    if (!box.dataset || !box.dataset.all) return;
    document.querySelectorAll("input[name=" + box.dataset.all + "]").forEach(function (b) { b.checked = box.checked; });
  });
})();
