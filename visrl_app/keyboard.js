// VisRL curation desk shortcuts. Presses queue up and are replayed one at a time: each click
// waits until the desk's ticket line (#pairs-ticket) shows a new view number ("#12"), i.e. the
// previous action's answer (with the pair's new version) is on screen, so fast repeated presses
// are never dropped and never act on a stale version. The number, not any text change: while a
// request runs gradio writes a timer ("0.6s") into the same block.
(() => {
  const KEYS = {
    a: "pairs-accept", r: "pairs-reject", s: "pairs-swap", u: "pairs-undo", p: "pairs-reset",
    b: "pairs-save-boxes", w: "pairs-save-answers", j: "pairs-next", k: "pairs-prev",
    ArrowRight: "pairs-next", ArrowLeft: "pairs-prev",
  };
  const queue = [];
  let busy = false;
  const ticket = () => {
    const el = document.querySelector("#pairs-ticket");
    const match = el ? el.textContent.match(/#(\d+)/) : null;
    return match ? match[1] : "";
  };
  // The view number rides along with every desk event (hidden #pairs-view textbox): inputs that
  // belong to an older view than the server's (a click while a request ran) are not saved.
  const syncView = () => {
    const box = document.querySelector("#pairs-view textarea, #pairs-view input");
    const now = ticket();
    if (!box || box.value === now) return;
    box.value = now;
    box.dispatchEvent(new Event("input", { bubbles: true }));
  };
  // Watch only the ticket (gradio re-renders thousands of nodes per answer elsewhere); it is
  // created after this script runs, so attach once it exists.
  const attach = setInterval(() => {
    const el = document.querySelector("#pairs-ticket");
    if (!el) return;
    clearInterval(attach);
    new MutationObserver(syncView).observe(el, { subtree: true, childList: true, characterData: true });
    syncView();
  }, 50);
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
  async function pump() {
    if (busy) return;
    busy = true;
    try {
      while (queue.length) {
        const id = queue.shift();
        const button = document.querySelector("#" + id);
        if (!button) continue;
        const before = ticket();
        button.click();
        const start = Date.now();
        while (ticket() === before && Date.now() - start < 15000) await sleep(25);
      }
    } finally {
      busy = false;
    }
  }
  document.addEventListener("keydown", (event) => {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    const tag = target && target.tagName;
    const typing = tag === "INPUT" || tag === "TEXTAREA" || tag === "SELECT" || (target && target.isContentEditable);
    // Esc leaves a text box on the desk, so the next key is a shortcut again, not text.
    if (typing && event.key === "Escape" && target.closest && target.closest("#pairs-desk")) {
      event.preventDefault();
      target.blur();
      return;
    }
    if (typing) return;
    const desk = document.querySelector("#pairs-desk");
    if (!desk || desk.offsetParent === null) return; // the Pairs tab is not on screen
    const id = KEYS[event.key.length === 1 ? event.key.toLowerCase() : event.key];
    if (!id) return;
    event.preventDefault();
    queue.push(id);
    pump();
  });
  window.visrlShortcutQueue = () => queue.length + (busy ? 1 : 0);

  // Unsaved edits: a typed answer or a touched box marks the desk dirty (a marker shows, and
  // leaving or reloading the page asks first). Every desk action saves the edits on screen
  // before it moves on, so the next ticket (the server's answer) clears the mark, unless that
  // answer says the edits were kept on screen unsaved (a conflict, an invalid box): they stay
  // dirty until saved or discarded (U). KEPT is pairs_tab.EDITS_KEPT.
  const KEPT = "edits kept on screen, not saved";
  let dirty = false;
  let lastTicket = null;
  const setDirty = (value) => {
    dirty = value;
    // On the desk, not <body>: gradio scopes the app's CSS to its own container.
    const desk = document.querySelector("#pairs-desk");
    if (desk) desk.classList.toggle("visrl-dirty", value);
  };
  const inDesk = (el, id) => el && el.closest && el.closest("#" + id);
  document.addEventListener("input", (event) => {
    if (inDesk(event.target, "pairs-chosen-answer") || inDesk(event.target, "pairs-rejected-answer")) setDirty(true);
  }, true);
  let boxPointer = false;
  document.addEventListener("pointerdown", (event) => {
    boxPointer = Boolean(inDesk(event.target, "pairs-annotator") && event.target.tagName === "CANVAS");
  }, true);
  document.addEventListener("pointerup", () => {
    if (boxPointer) setDirty(true);
    boxPointer = false;
  }, true);
  document.addEventListener("keydown", (event) => {
    if (inDesk(event.target, "pairs-annotator") && (event.key === "Delete" || event.key === "Backspace")) setDirty(true);
  }, true);
  setInterval(() => {
    const now = ticket();
    if (lastTicket !== null && now !== lastTicket) {
      const el = document.querySelector("#pairs-ticket");
      if (!(el && el.textContent.includes(KEPT))) setDirty(false);
    }
    lastTicket = now;
  }, 100);
  window.addEventListener("beforeunload", (event) => {
    if (!dirty) return;
    event.preventDefault();
    event.returnValue = "";
  });
  window.visrlDirty = () => dirty;
})();
