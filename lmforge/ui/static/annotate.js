// Keyboard labelling: each key clicks its button, so a key and a click send the same form.
// Keys typed into the reason box are text, not labels (Escape leaves the box).
(function () {
  "use strict";
  const KEYS = {
    ArrowLeft: "left", "1": "left", ArrowRight: "right", "2": "right", t: "tie", "3": "tie",
    b: "both_bad", "4": "both_bad", s: "skip", "0": "skip",
    ArrowUp: "up", u: "up", ArrowDown: "down", d: "down",
  };
  const form = document.getElementById("label-form");
  if (!form) return;
  let sent = false;  // a held key sends one label, not several
  form.addEventListener("submit", () => { sent = true; });
  document.addEventListener("keydown", (ev) => {
    const typing = ev.target instanceof HTMLTextAreaElement || ev.target instanceof HTMLInputElement;
    if (typing) {
      if (ev.key === "Escape") ev.target.blur();
      return;
    }
    if (ev.ctrlKey || ev.metaKey || ev.altKey || sent) return;
    const choice = KEYS[ev.key];
    const button = choice && form.querySelector(`button[data-key="${choice}"]`);
    if (button) {
      ev.preventDefault();
      button.click();
    }
  });
})();
