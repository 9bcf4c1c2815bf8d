// The chat page of Pi Agent Server: a client of the native API, like curl. No library, no
// build step. Nothing a reply, a source or a tool result holds is ever parsed as HTML: the
// page builds its elements and sets their text (textContent), never innerHTML.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY = "pi-agent.key";
  const CONVERSATION = "pi-agent.conversation";
  const TITLES = "pi-agent.titles";
  const AGENT = "pi-agent.agent";
  // How long a cancelled stream may take to end before the page drops it itself.
  const CANCEL_GRACE_MS = 5000;

  const saved = {
    get(name) {
      try { return localStorage.getItem(name) || ""; } catch (e) { return ""; }
    },
    set(name, value) {
      try {
        if (value) localStorage.setItem(name, value); else localStorage.removeItem(name);
      } catch (e) { /* private mode: kept for this visit only */ }
    },
    titles() {
      let titles = null;
      try { titles = JSON.parse(this.get(TITLES) || "{}"); } catch (e) { /* damaged */ }
      return titles && typeof titles === "object" ? titles : {};
    },
  };

  let conversationId = saved.get(CONVERSATION);
  let running = null; // the turn under way: {controller, id, stopped, ended, dropped}
  // Counts what changes the conversation shown (a send, New, opening one): an answer to an
  // older change arrives late and is dropped, instead of mixing two conversations.
  let shown = 0;

  // --- talking to the server ------------------------------------------------------------

  function call(path, options) {
    const headers = Object.assign({}, (options && options.headers) || {});
    const key = saved.get(KEY);
    if (key) headers["X-API-Key"] = key;
    return fetch(path, Object.assign({}, options, { headers: headers, cache: "no-store" }));
  }

  async function refusal(response) {
    let error = {};
    try { error = (await response.json()).error || {}; } catch (e) { /* not JSON */ }
    return { status: response.status, code: error.code || "", message: error.message || "",
             wait: response.headers.get("Retry-After") };
  }

  function waitWords(seconds) {
    const s = Math.max(1, Math.ceil(Number(seconds) || 0));
    if (s < 90) return s + (s === 1 ? " second" : " seconds");
    const m = Math.ceil(s / 60);
    return m < 90 ? m + " minutes" : Math.ceil(m / 60) + " hours";
  }

  // An error as a person reads it: what happened and what to do.
  function explain(error) {
    const wait = error.wait ? " Try again in " + waitWords(error.wait) + "." : "";
    switch (error.code) {
      case "invalid_api_key":
        return "This server needs an API key. Type yours in the field above.";
      case "local_only":
        return "This server answers only the machine it runs on. To use it from another "
          + "device, its owner has to create API keys (see docs/security.md).";
      case "permission_denied":
        return "Your API key may not use this agent or model.";
      case "queue_full":
        return "The model is busy and the waiting line is full." + wait;
      case "rate_limited":
        return "Your API key has used up its limit for now." + wait;
      case "conversation_busy":
        return "This conversation is still answering another message. Wait for it, or "
          + "press Stop there first.";
      case "store_unavailable":
        return "The server cannot reach its memory of conversations right now." + wait;
      case "upstream_unavailable":
        return "The model server (Ollama) cannot be reached. Is it running?";
      case "upstream_timeout":
        return "The model took too long to answer. It may still be loading: try again "
          + "in a minute.";
      case "upstream_error":
      case "upstream_protocol_error":
        return "The model server failed while answering. Try again.";
      case "model_not_found":
        return error.message || "The model is not installed on the model server.";
      case "server_shutting_down":
        return "The server is restarting. Send your message again in a moment.";
      case "cancelled":
        return "Stopped.";
      case "conversation_not_found":
        return "That conversation is not kept by the server any more (or is another key's).";
      case "validation_error":
        return "The server could not accept that message: " + (error.message || "");
    }
    if (error.status === 429) return "Too many requests." + wait;
    if (error.status === 503) return "The server is not ready." + wait;
    return error.message || "The server answered with status " + error.status + ".";
  }

  function askForKey(why) {
    $("key-why").textContent = why;
    $("key-form").hidden = false;
    $("key").value = saved.get(KEY);
    $("key").focus();
  }

  function notice(text) { $("notice").textContent = text || ""; }

  // --- Markdown, built as elements ------------------------------------------------------

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // `code`, **bold**, *italic* or _italic_, [text](http(s) link); the rest is text. Each
  // span is bounded, so that a line full of unclosed marks costs linear time, and there is
  // no lookbehind (Safari before 16.4 would not load the script).
  const INLINE = /(`+)([^\n]{1,2000}?)\1|\*\*(?=\S)([^\n]{0,2000}?\S)\*\*|(^|[\s(])[*_](?=\S)([^*_\n]{0,2000}?\S)[*_](?![\w*])|\[([^\]\n]{1,500})\]\((https?:\/\/[^\s)]{1,2000})\)/g;
  // A longer line is shown as it is: drawing must not hold the page up.
  const LONGEST_MARKED_LINE = 4096;

  function inline(text, parent) {
    if (text.length > LONGEST_MARKED_LINE) {
      parent.append(text);
      return;
    }
    let at = 0;
    for (const found of text.matchAll(INLINE)) {
      if (found.index > at) parent.append(text.slice(at, found.index));
      if (found[1]) {
        parent.append(el("code", "", found[2]));
      } else if (found[3] !== undefined) {
        inline(found[3], parent.appendChild(el("strong")));
      } else if (found[5] !== undefined) {
        parent.append(found[4]);
        inline(found[5], parent.appendChild(el("em")));
      } else {
        // The address is shown on hover: a link's words cannot hide where it goes.
        const link = el("a", "", found[6]);
        link.href = link.title = found[7];
        link.target = "_blank";
        link.rel = "noopener noreferrer nofollow";
        parent.append(link);
      }
      at = found.index + found[0].length;
    }
    if (at < text.length) parent.append(text.slice(at));
  }

  function lineBroken(lines, parent) {
    lines.forEach((line, i) => {
      if (i) parent.append(el("br"));
      inline(line, parent);
    });
    return parent;
  }

  const FENCE = /^\s*(```|~~~)/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

  function markdown(text, into) {
    into.replaceChildren();
    const lines = text.split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (!line.trim()) { i++; continue; }
      const fence = line.match(FENCE);
      if (fence) {
        const body = [];
        for (i++; i < lines.length && !lines[i].trim().startsWith(fence[1]); i++) {
          body.push(lines[i]);
        }
        i++;
        into.appendChild(el("pre")).append(el("code", "", body.join("\n")));
        continue;
      }
      const heading = line.match(HEADING);
      if (heading) {
        inline(heading[2], into.appendChild(el("h" + Math.min(6, heading[1].length + 2))));
        i++;
        continue;
      }
      if (RULE.test(line)) { into.append(el("hr")); i++; continue; }
      if (ITEM.test(line)) {
        const ordered = /\d/.test(line.match(ITEM)[1]);
        const list = into.appendChild(el(ordered ? "ol" : "ul"));
        if (ordered) list.start = parseInt(line.match(ITEM)[1], 10) || 1;
        for (; i < lines.length && ITEM.test(lines[i]); i++) {
          inline(lines[i].match(ITEM)[2], list.appendChild(el("li")));
        }
        continue;
      }
      if (QUOTE.test(line)) {
        const quoted = [];
        for (; i < lines.length && QUOTE.test(lines[i]); i++) {
          quoted.push(lines[i].match(QUOTE)[1]);
        }
        lineBroken(quoted, into.appendChild(el("blockquote")));
        continue;
      }
      const paragraph = [];
      for (; i < lines.length && lines[i].trim() && !FENCE.test(lines[i])
             && !HEADING.test(lines[i]) && !ITEM.test(lines[i]) && !QUOTE.test(lines[i]); i++) {
        paragraph.push(lines[i]);
      }
      lineBroken(paragraph, into.appendChild(el("p")));
    }
  }

  // --- one turn on the page -------------------------------------------------------------

  class TurnView {
    constructor(user) {
      this.node = $("messages").appendChild(el("div", "turn"));
      this.node.append(el("div", "msg user", user));
      this.answer = el("div", "msg assistant");
      this.meta = this.answer.appendChild(el("div", "meta"));
      this.tools = this.answer.appendChild(el("div", "tools"));
      this.reply = this.answer.appendChild(el("div", "reply"));
      this.note = this.answer.appendChild(el("div", "note"));
      this.text = "";
      this.calls = {};
      this.pending = 0;
      this.drawMs = 0;
      this.node.append(this.answer);
    }
    say(text, isError) {
      const follow = atBottom();
      this.note.textContent = text || "";
      this.note.classList.toggle("error", !!isError);
      if (follow) scrollDown();
    }
    route(data) {
      this.meta.textContent = "Routed to " + data.agent + " (" + data.route + ", by "
        + data.by + ")";
    }
    add(piece) {
      this.text += piece;
      if (this.note.textContent) this.say("");
      // Not parsed again for each token: drawn every 40 ms, or less often when a long
      // reply takes long to draw, so that drawing takes at most a fifth of the time.
      if (!this.pending) {
        this.pending = setTimeout(() => this.draw(), Math.max(40, 4 * this.drawMs));
      }
    }
    draw() {
      clearTimeout(this.pending);
      this.pending = 0;
      const follow = atBottom();
      const began = performance.now();
      markdown(this.text, this.reply);
      this.drawMs = performance.now() - began;
      if (follow) scrollDown();
    }
    toolCall(data) {
      const row = this.tools.appendChild(el("details"));
      const summary = row.appendChild(el("summary", "", data.name + " … running"));
      row.append(el("div", "meta", "arguments"));
      row.append(el("pre", "", JSON.stringify(data.arguments, null, 2)));
      this.calls[data.id] = { row: row, summary: summary };
    }
    toolResult(data) {
      let call = this.calls[data.id];
      if (!call) {
        this.toolCall({ id: data.id, name: data.name, arguments: {} });
        call = this.calls[data.id];
      }
      call.summary.textContent = data.name + (data.ok ? " ✓ " : " ✗ failed ") + data.ms + " ms";
      call.row.append(el("div", "meta", "result"));
      call.row.append(el("pre", "", data.content));
    }
    sources(list) {
      if (!list.length) return;
      const listed = this.answer.appendChild(el("ol", "sources"));
      for (const source of list) {
        const item = listed.appendChild(el("li", "", source.title || source.path || source.id));
        if (source.path && source.path !== source.title) item.append(" (" + source.path + ")");
        if (source.snippet) item.title = source.snippet;
      }
    }
  }

  // The page follows a reply as it grows only while the reader is at its end: one who
  // scrolled up to read stays where they are.
  function atBottom() {
    const box = $("messages");
    return box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  }

  function scrollDown() {
    const box = $("messages");
    box.scrollTop = box.scrollHeight;
  }

  // --- sending, streaming, stopping -----------------------------------------------------

  async function send(message) {
    shown++;
    const view = new TurnView(message);
    view.say("Sending…");
    scrollDown();
    view.answer.setAttribute("aria-busy", "true");
    const controller = new AbortController();
    const turn = running = { controller: controller, id: conversationId, stopped: false,
                             ended: false, dropped: 0 };
    setRunning(true);
    const body = { message: message, agent: $("agent").value || undefined };
    if (conversationId) body.conversation_id = conversationId;
    try {
      const response = await call("/chat/stream", {
        method: "POST", body: JSON.stringify(body), signal: controller.signal,
        headers: { "Content-Type": "application/json", "Accept": "text/event-stream" },
      });
      if (!response.ok) {
        const error = await refusal(response);
        view.say(explain(error), true);
        if (error.status === 401) {
          askForKey(explain(error));
          $("message").value = message;
        }
        if (error.code === "conversation_not_found") forget(turn.id);
        return;
      }
      await readEvents(response.body.getReader(), (name, data) => onEvent(view, turn, name, data));
      if (!turn.ended) view.say(turn.stopped ? "Stopped." : "The answer was cut off.", true);
    } catch (e) {
      if (!turn.ended) {
        view.say(turn.stopped ? "Stopped." : "The connection to the server was lost.", true);
      }
    } finally {
      // A stream left unread (a failure while reading it) would keep the model generating
      // and the conversation busy: hang up on it.
      clearTimeout(turn.dropped);
      if (!turn.ended) controller.abort();
      view.draw();
      view.answer.removeAttribute("aria-busy");
      running = null;
      setRunning(false);
      listConversations();
    }
  }

  // The server no longer has this conversation: the next message starts a new one.
  function forget(id) {
    if (id && conversationId === id) {
      conversationId = "";
      saved.set(CONVERSATION, "");
    }
  }

  function onEvent(view, turn, name, data) {
    switch (name) {
      case "start":
        turn.id = data.conversation_id;
        if (conversationId !== turn.id) {
          conversationId = turn.id;
          saved.set(CONVERSATION, conversationId);
          const titles = saved.titles();
          titles[turn.id] = view.node.firstChild.textContent.slice(0, 80);
          saved.set(TITLES, JSON.stringify(titles));
        }
        view.say("Waiting for the model…");
        break;
      case "queued":
        view.say(data.position ? "Waiting in line: number " + data.position
          + ". The model answers one request at a time." : "Waiting for the model…");
        break;
      case "route":
        view.route(data);
        view.say("Waiting for the model…");
        break;
      case "sources":
        turn.sources = data.sources;
        break;
      case "tool_call":
        view.toolCall(data);
        view.say("Running " + data.name + "…");
        break;
      case "tool_result":
        view.toolResult(data);
        view.say("Waiting for the model…");
        break;
      case "token":
        view.add(data.content);
        break;
      case "done":
        turn.ended = true;
        view.say(data.done_reason === "length" ? "The reply reached its length limit." : "");
        view.draw();
        view.sources(turn.sources || []);
        break;
      case "error":
        turn.ended = true;
        view.draw();
        view.sources(turn.sources || []);
        view.say(explain(data), data.code !== "cancelled");
        break;
    }
  }

  // Server-Sent Events from a fetch body: blocks end with a blank line; a line starting
  // with ":" is a heartbeat. Lines may end in CRLF or CR too, as the format allows (a CR
  // held back at a read's end could be half of a CRLF: it waits for the next read).
  async function readEvents(reader, each) {
    const decoder = new TextDecoder();
    let buffer = "";
    let held = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      let text = held + decoder.decode(value, { stream: true });
      held = text.endsWith("\r") ? "\r" : "";
      if (held) text = text.slice(0, -1);
      buffer += text.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let name = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) each(name, JSON.parse(data.join("\n")));
      }
    }
  }

  async function stop() {
    const turn = running;
    if (!turn || turn.stopped) return;
    turn.stopped = true;
    $("stop").disabled = true;
    // The server stops the model and keeps the partial answer; the stream then ends with
    // a "cancelled" event. Without an id yet, or if the cancel fails, the page hangs up,
    // which the server treats the same way.
    turn.dropped = setTimeout(() => turn.controller.abort(), CANCEL_GRACE_MS);
    try {
      if (!turn.id) throw new Error("no conversation yet");
      const response = await call("/chat/" + encodeURIComponent(turn.id) + "/cancel",
                                  { method: "POST" });
      if (!response.ok) throw new Error("cancel refused");
    } catch (e) {
      clearTimeout(turn.dropped);
      turn.controller.abort();
    }
  }

  function setRunning(on) {
    $("send").disabled = on;
    $("stop").hidden = !on;
    $("stop").disabled = false;
  }

  // --- agents and conversations ---------------------------------------------------------

  async function loadAgents() {
    let response;
    try {
      response = await call("/agents");
    } catch (e) {
      notice("The server cannot be reached.");
      return false;
    }
    if (!response.ok) {
      const error = await refusal(response);
      if (error.status === 401) askForKey(explain(error));
      notice(explain(error));
      return false;
    }
    const names = (await response.json()).agents || [];
    const picker = $("agent");
    picker.replaceChildren(...names.map((name) => el("option", "", name)));
    const chosen = saved.get(AGENT);
    if (names.includes(chosen)) picker.value = chosen;
    $("key-form").hidden = true;
    $("forget-key").hidden = !saved.get(KEY);
    notice("");
    return true;
  }

  let listings = 0;

  async function listConversations() {
    const mine = ++listings;
    let listed = [];
    try {
      const response = await call("/conversations");
      if (response.ok) listed = (await response.json()).conversations || [];
    } catch (e) { /* the list stays as it was */ return; }
    if (mine !== listings) return; // a later listing is under way: it shows the newer list
    const titles = saved.titles();
    const items = listed.map((c) => {
      const button = el("button", "", titles[c.conversation_id] || c.conversation_id);
      button.type = "button";
      button.title = c.conversation_id;
      button.append(" ", el("small", "", "(" + c.turns + ")"));
      button.setAttribute("aria-current", String(c.conversation_id === conversationId));
      button.addEventListener("click", () => openConversation(c.conversation_id));
      const item = el("li");
      item.append(button);
      return item;
    });
    $("conversations").replaceChildren(...items);
  }

  async function openConversation(id) {
    if (running) return;
    const mine = ++shown;
    conversationId = id;
    saved.set(CONVERSATION, id);
    $("messages").replaceChildren();
    notice("");
    listConversations();
    if (!id) return;
    let response, turns;
    try {
      response = await call("/conversations/" + encodeURIComponent(id));
      turns = response.ok ? (await response.json()).turns : null;
    } catch (e) {
      if (mine === shown) notice("The server cannot be reached.");
      return;
    }
    if (mine !== shown) return; // another conversation was opened, or a message sent, since
    if (response.status === 404) {
      // Forgotten by the server (idle too long, or deleted), or another key's (an admin
      // key lists every key's conversations, and reads only its own): start afresh.
      forget(id);
      notice(explain({ code: "conversation_not_found" }));
      return;
    }
    if (!response.ok) {
      notice(explain(await refusal(response)));
      return;
    }
    for (const turn of turns) {
      const view = new TurnView(turn.user);
      view.text = turn.assistant;
      view.draw();
      if (turn.partial) view.say("Stopped before the end.");
    }
  }

  // --- wiring ---------------------------------------------------------------------------

  async function start() {
    if (await loadAgents()) {
      await openConversation(conversationId);
    }
  }

  function submit() {
    const message = $("message").value;
    if (!message.trim() || running) return;
    $("message").value = "";
    send(message);
  }

  // A phone's keyboard has no Shift+Enter: there Enter is a new line and Send sends.
  const touch = window.matchMedia("(pointer: coarse)").matches;
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    submit();
  });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing && !touch) {
      event.preventDefault();
      submit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new").addEventListener("click", () => openConversation(""));
  $("agent").addEventListener("change", () => saved.set(AGENT, $("agent").value));
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saved.set(KEY, $("key").value.trim());
    start();
  });
  // On a shared device: the key goes, and with it what this browser kept of its
  // conversations (their titles are their first messages); the server keeps them.
  $("forget-key").addEventListener("click", () => {
    if (running) return;
    ++shown;
    for (const name of [KEY, CONVERSATION, TITLES]) saved.set(name, "");
    conversationId = "";
    $("messages").replaceChildren();
    $("conversations").replaceChildren();
    $("agent").replaceChildren();
    $("key").value = "";
    $("forget-key").hidden = true;
    start();
  });
  start();
})();
