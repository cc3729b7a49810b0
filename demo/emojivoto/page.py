"""The page web serves at `/` and `/leaderboard`: one self-contained HTML document, no external assets.

Upstream ships a React bundle; this is the same idea in a few lines of plain JavaScript that call the
same JSON API, so a browser behind the mesh makes the same requests vote-bot does.
"""

from __future__ import annotations

import html

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Emoji Vote</title>
<style>
  body { font-family: sans-serif; margin: 2rem auto; max-width: 56rem; padding: 0 1rem; color: #222; }
  nav a { margin-right: 1rem; }
  #motd { color: #555; }
  #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(4rem, 1fr)); gap: .5rem; }
  #grid button { font-size: 2rem; padding: .4rem; cursor: pointer; background: #fafafa;
                 border: 1px solid #ddd; border-radius: .4rem; }
  #grid button:hover { background: #eef; }
  #status { min-height: 1.5rem; margin: 1rem 0; }
  .error { color: #b00; }
  table { border-collapse: collapse; } td { padding: .2rem .8rem; font-size: 1.2rem; }
</style>
</head>
<body>
<nav><a href="/">Vote</a><a href="/leaderboard">Leaderboard</a></nav>
<h1>🗳 Emoji Vote</h1>
<p id="motd">__MOTD__</p>
<div id="status"></div>
<div id="main"></div>
<script>
const main = document.getElementById("main");
const statusLine = document.getElementById("status");

function show(text, isError) {
  statusLine.textContent = text;
  statusLine.className = isError ? "error" : "";
}

async function getJSON(url) {
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function vote(emoji) {
  const response = await fetch("/api/vote?choice=" + encodeURIComponent(emoji.shortcode));
  if (response.ok) {
    show("You voted for " + emoji.unicode + " " + emoji.shortcode, false);
  } else {
    let detail = response.statusText;
    try { detail = (await response.json()).error; } catch (e) {}
    show("Voting for " + emoji.unicode + " failed (" + response.status + "): " + detail, true);
  }
}

async function renderVote() {
  const list = await getJSON("/api/list");
  const grid = document.createElement("div");
  grid.id = "grid";
  for (const emoji of list) {
    const button = document.createElement("button");
    button.textContent = emoji.unicode;
    button.title = emoji.shortcode;
    button.onclick = () => vote(emoji);
    grid.appendChild(button);
  }
  main.replaceChildren(grid);
}

async function renderLeaderboard() {
  const board = await getJSON("/api/leaderboard");
  const table = document.createElement("table");
  for (const row of board) {
    const tr = table.insertRow();
    tr.insertCell().textContent = row.unicode;
    tr.insertCell().textContent = row.shortcode;
    tr.insertCell().textContent = row.votes;
  }
  main.replaceChildren(board.length ? table : document.createTextNode("No votes yet."));
}

const render = location.pathname === "/leaderboard" ? renderLeaderboard : renderVote;
render().catch(err => show("Could not load: " + err.message, true));
</script>
</body>
</html>
"""


def render(message_of_the_day: str = "") -> str:
    """The page, with the operator's MESSAGE_OF_THE_DAY (escaped) above the emoji."""
    return _PAGE.replace("__MOTD__", html.escape(message_of_the_day))
