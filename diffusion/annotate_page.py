"""The one page diffusion.annotate serves. It asks the server for GET /api/state?annotator=NAME, POST /api/answer
{annotator, pair_id, choice, note} and POST /api/undo {annotator}, and shows /img/<pair id>/left and /right.
"""
PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fairsynth: image preferences</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;background:#f6f6f4;color:#222}
#who,#work{max-width:760px;margin:auto} #work{display:none}
.imgs{display:flex;gap:16px;justify-content:center;margin:14px 0}
.imgs figure{margin:0;text-align:center} .imgs img{width:320px;height:320px;image-rendering:pixelated;
border:1px solid #999;background:#000}
.cond{font-size:1.5em;font-weight:600;text-align:center} .q{text-align:center;color:#444}
.btns{display:flex;gap:8px;justify-content:center;flex-wrap:wrap} button{font-size:1em;padding:8px 12px}
progress{width:100%;height:14px} .meta{display:flex;justify-content:space-between;font-size:.9em;color:#555}
textarea{width:100%;height:40px;margin-top:8px} #msg{color:#a00;text-align:center;min-height:1.2em}
</style></head><body>
<div id="who"><h2>Image preferences</h2><p>Your name or initials (your answers are saved under it; the same name
resumes where you stopped):</p><input id="name" maxlength="40" autofocus>
<button id="start">Start</button><p id="msg0"></p></div>
<div id="work"><div class="meta"><span id="me"></span><span id="count"></span></div><progress id="bar"></progress>
<p class="q" id="q"></p><div class="cond" id="cond"></div>
<div class="imgs"><figure><img id="L" alt="left image"><figcaption>left (1)</figcaption></figure>
<figure><img id="R" alt="right image"><figcaption>right (2)</figcaption></figure></div>
<div class="btns"><button data-c="left">Left better (1)</button><button data-c="right">Right better (2)</button>
<button data-c="both_unacceptable">Both unacceptable (3)</button><button data-c="cannot_tell">Cannot tell (4)</button>
<button id="undo">Undo last (u)</button></div>
<textarea id="note" maxlength="500" placeholder="optional note on this pair"></textarea><p id="msg"></p></div>
<script>
let me=localStorage.getItem("annotator")||"", cur=null;
const $=id=>document.getElementById(id);
$("name").value=me;
async function call(path,body){const r=await fetch(path,body?{method:"POST",headers:{"Content-Type":
"application/json"},body:JSON.stringify(body)}:{});const j=await r.json();if(!r.ok)throw new Error(j.error);return j}
function show(s){cur=s.pair;$("me").textContent="annotator: "+s.annotator;$("count").textContent=s.done+" / "+
s.total+" answered";$("bar").max=s.total;$("bar").value=s.done;$("q").textContent=s.question;$("undo").disabled=
!s.can_undo;$("note").value="";$("msg").textContent="";if(!cur){$("cond").textContent="All pairs answered: thank "+
"you. You may close this page.";$("L").removeAttribute("src");$("R").removeAttribute("src");return}
$("cond").textContent=cur.text;$("L").src="/img/"+cur.id+"/left";$("R").src="/img/"+cur.id+"/right"}
async function start(){me=$("name").value.trim();try{const s=await call("/api/state?annotator="+
encodeURIComponent(me));localStorage.setItem("annotator",me);$("who").style.display="none";
$("work").style.display="block";show(s)}catch(e){$("msg0").textContent=e.message}}
async function answer(c){if(!cur)return;try{show(await call("/api/answer",{annotator:me,pair_id:cur.id,choice:c,
note:$("note").value}))}catch(e){$("msg").textContent=e.message}}
async function undo(){try{show(await call("/api/undo",{annotator:me}))}catch(e){$("msg").textContent=e.message}}
$("start").onclick=start;$("name").onkeydown=e=>{if(e.key==="Enter")start()};
document.querySelectorAll("button[data-c]").forEach(b=>b.onclick=()=>answer(b.dataset.c));$("undo").onclick=undo;
document.onkeydown=e=>{if($("work").style.display!=="block"||e.target.id==="note")return;
const k={"1":"left","2":"right","3":"both_unacceptable","4":"cannot_tell"}[e.key];if(k)answer(k);
else if(e.key==="u")undo()};
</script></body></html>"""
