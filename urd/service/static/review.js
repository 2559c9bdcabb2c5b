// Keyboard shortcuts of the review queue: j / k move between cards, g / d post "good" / "defect"
// for the focused card (the same form the buttons post, CSRF field included). No dependencies.
(function () {
  "use strict";
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));
  var current = 0;
  function focus(i) {
    if (!cards.length) return;
    current = Math.max(0, Math.min(cards.length - 1, i));
    cards.forEach(function (c, k) { c.classList.toggle("focused", k === current); });
    cards[current].focus();
  }
  function post(verdict) {
    var form = cards[current] && cards[current].querySelector("form");
    if (!form) return;
    var button = form.querySelector('button[value="' + verdict + '"]');
    if (form.requestSubmit) form.requestSubmit(button); else button.click();
  }
  cards.forEach(function (c, k) { c.addEventListener("click", function () { focus(k); }); });
  document.addEventListener("keydown", function (e) {
    if (e.target && (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || e.target.tagName === "TEXTAREA")) return;
    if (e.ctrlKey || e.metaKey || e.altKey) return;
    if (e.key === "j") focus(current + 1);
    else if (e.key === "k") focus(current - 1);
    else if (e.key === "g") post("good");
    else if (e.key === "d") post("defect");
  });
  focus(0);
})();
