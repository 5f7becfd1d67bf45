// qwen-mlx chat page: the few things Gradio 6.31 has no way to do (see app.py). Kept small and in one place.
//  - the line under each message (statistics, ‹ k/n › alternatives, attachments) from #chat-meta, drawn outside
//    the message's markdown, so copying a message never copies it and an unclosed code fence cannot swallow it;
//  - Esc stops a reply; in an edit, Enter submits and Esc cancels;
//  - the focus goes back to the message box after every action (not on phones: it would open the keyboard);
//  - the conversation list starts open on wide screens, behind its button on phones.
(() => {
  const $ = (selector, root = document) => root.querySelector(selector);
  const wide = () => window.innerWidth > 768;

  function rowsMeta() {
    try {
      return JSON.parse($("#chat-meta textarea")?.value || "[]");
    } catch {
      return [];
    }
  }

  function chooseBranch(row, step) {
    const box = $("#branch-action textarea");
    if (!box) return;
    box.value = `${row}:${step}:${Date.now()}`; // a nonce: the same arrow twice is two changes
    box.dispatchEvent(new Event("input", { bubbles: true }));
  }

  function footerFor(row, meta) {
    const footer = document.createElement("div");
    footer.className = "qm-footer" + (meta.warn ? " warn" : "");
    if (meta.branch) {
      const [k, n] = meta.branch;
      const nav = document.createElement("span");
      nav.className = "qm-branch";
      for (const [label, step, text] of [["Previous alternative", -1, "‹"], ["Next alternative", 1, "›"]]) {
        const button = document.createElement("button");
        button.type = "button";
        button.className = step < 0 ? "qm-prev" : "qm-next";
        button.setAttribute("aria-label", label);
        button.textContent = text;
        button.disabled = step < 0 ? k <= 1 : k >= n;
        button.addEventListener("click", (event) => {
          event.stopPropagation();
          chooseBranch(row, step);
        });
        nav.append(button);
        if (step < 0) {
          const where = document.createElement("span");
          where.className = "qm-position";
          where.textContent = `${k}/${n}`;
          nav.append(where);
        }
      }
      footer.append(nav);
    }
    if (meta.footer) {
      const text = document.createElement("span");
      text.className = "qm-text";
      text.textContent = meta.footer; // text, never HTML: it holds file names the user chose
      footer.append(text);
    }
    return footer;
  }

  function decorate() {
    const data = rowsMeta();
    document.querySelectorAll("#chatbot .message-row").forEach((row, i) => {
      const bubble = row.querySelector(".message.user, .message.bot");
      if (!bubble) return;
      const meta = data[i] || {};
      const signature = JSON.stringify([i, meta.footer, meta.branch, meta.warn]);
      let footer = bubble.querySelector(":scope > .qm-footer");
      if (footer && footer.dataset.signature === signature) return;
      footer?.remove();
      if (!meta.footer && !meta.branch) return;
      footer = footerFor(i, meta);
      footer.dataset.signature = signature;
      bubble.append(footer);
    });
  }

  function editButton(textarea, which) {
    const panel = textarea.closest(".message-row")?.nextElementSibling;
    const buttons = panel ? [...panel.querySelectorAll("button")] : [];
    const named = buttons.find((b) => (b.getAttribute("aria-label") || "").toLowerCase() === which);
    return named || buttons[which === "submit" ? 0 : 1];
  }

  function focusMessage() {
    const box = $("#message textarea");
    const active = document.activeElement;
    const typing = active && active !== box && active.matches("input, textarea, select, [contenteditable]");
    if (box && wide() && !typing && !box.disabled) box.focus();
  }

  document.addEventListener("keydown", (event) => {
    const target = event.target;
    if (target instanceof HTMLTextAreaElement && target.classList.contains("edit-textarea")) {
      if ((event.key === "Enter" && !event.shiftKey && !event.isComposing) || event.key === "Escape") {
        event.preventDefault();
        editButton(target, event.key === "Enter" ? "submit" : "cancel")?.click();
        setTimeout(focusMessage, 50);
      }
      return;
    }
    if (event.key === "Escape") {
      const stop = $("#message .stop-button");
      if (stop) {
        event.preventDefault();
        stop.click();
      }
    }
  }, true);

  document.addEventListener("click", (event) => {
    const control = event.target.closest("button, input[type=radio]");
    if (!control) return;
    if (!wide()) {
      // On a phone the list covers the page: picking a conversation (or a new one) closes it.
      if (control.closest("#conversations, #new-chat")) {
        const sidebar = $("#sidebar");
        if (sidebar?.classList.contains("open")) setTimeout(() => $(".toggle-button", sidebar)?.click(), 0);
      }
      return;
    }
    if (control.closest("#message, #settings, #search, #title, #attach, #import-json, .toggle-button")) return;
    if ((control.getAttribute("aria-label") || "") === "Edit") return; // the edit box takes the focus
    setTimeout(focusMessage, 0);
    setTimeout(focusMessage, 500); // again once the page has updated
  }, true);

  let started = false;
  function start() {
    const box = $("#message textarea");
    const sidebar = $("#sidebar");
    if (!box || !sidebar || box.disabled) return; // enabled once the page has its conversation
    started = true;
    if (wide()) {
      if (!sidebar.classList.contains("open")) $(".toggle-button", sidebar)?.click();
      box.focus(); // not on phones: focusing would scroll the page to the box and open the keyboard
    }
  }

  let scheduled = false;
  new MutationObserver(() => {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => {
      scheduled = false;
      decorate();
    });
  }).observe(document.documentElement, { subtree: true, childList: true, characterData: true });
  // #chat-meta changes its value without a DOM mutation: look again a few times a second.
  setInterval(() => {
    if (!started) start();
    decorate();
  }, 200);
})();
