"""The one page diffusion.annotate serves. The annotator's private link ends in #t=<token>; the page sends the token
as the X-Annotator-Token header with GET /api/state, POST /api/answer {pair_id, choice, note, rating} and POST
/api/undo {}, and shows /img/<pair id>/left and /right (a reader study: /img/<id>/image).

Only deliberate answers: a key counts on its first press only (no auto-repeat, and a key still held when a new pair
appears is ignored until released); buttons never keep the keyboard focus (Enter or Space cannot repeat a click);
nothing is sent while an answer is on its way, nor before the pair's images have been on screen for the server's
minimum; an error is shown only while its pair is on screen.
"""
PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>fairsynth: image reading</title>
<style>
body{font-family:system-ui,sans-serif;margin:24px;background:#f6f6f4;color:#222}
.box{max-width:820px;margin:auto} #work,#end,#intro{display:none}
.imgs{display:flex;gap:16px;justify-content:center;margin:14px 0}
.imgs figure{margin:0;text-align:center} .imgs img{width:320px;height:320px;object-fit:contain;
image-rendering:pixelated;border:1px solid #999;background:#000;cursor:zoom-in;filter:url(#wl)}
.cond{font-size:1.5em;font-weight:600;text-align:center} .q{text-align:center;color:#444}
.btns{display:flex;gap:8px;justify-content:center;flex-wrap:wrap;margin:6px 0}
button{font-size:1em;padding:8px 12px} button.on{background:#246;color:#fff}
progress{width:100%;height:14px} .meta{display:flex;justify-content:space-between;font-size:.9em;color:#555}
.wl{display:flex;gap:14px;justify-content:center;align-items:center;font-size:.9em;color:#444}
textarea{width:100%;height:40px;margin-top:8px} .msg{color:#a00;text-align:center;min-height:1.2em}
#zoom{display:none;position:fixed;inset:0;background:rgba(0,0,0,.92);z-index:9;cursor:zoom-out;
align-items:center;justify-content:center} #zoom img{max-width:96vw;max-height:96vh;min-width:min(96vw,96vh);
object-fit:contain;image-rendering:pixelated;filter:url(#wl)}
</style></head><body>
<svg width="0" height="0" style="position:absolute"><filter id="wl" color-interpolation-filters="sRGB">
<feComponentTransfer><feFuncR type="linear" slope="1" intercept="0"/><feFuncG type="linear" slope="1"
intercept="0"/><feFuncB type="linear" slope="1" intercept="0"/></feComponentTransfer></filter></svg>
<div class="box" id="nolink"><h2>Image reading</h2><p>Open this page through the private link the organiser gave
you (it ends in <code>#t=</code> and a code). Each link answers for one person only.</p></div>
<div class="box" id="intro"><h2>Image reading</h2><p id="hello"></p><ul id="howto"></ul>
<button id="start">Start</button><p class="msg" id="msg0"></p></div>
<div class="box" id="work"><div class="meta"><span id="me"></span><span id="count"></span></div>
<progress id="bar"></progress><p class="q" id="q"></p><div class="cond" id="cond"></div>
<div class="imgs" id="imgs"></div>
<div class="wl">window <input id="win" type="range" min="0.05" max="1" step="0.01" value="1">
level <input id="lev" type="range" min="0" max="1" step="0.01" value="0.5"> <button id="wlreset">reset</button></div>
<div class="btns" id="rate"></div><div class="btns" id="choices"></div>
<textarea id="note" maxlength="500" placeholder="optional note on this image or pair"></textarea>
<p class="msg" id="msg"></p></div>
<div class="box" id="end"><h2>All done: thank you</h2><p id="tally"></p><p>Your answers are saved. You may close
this page.</p><button id="undo2">Undo my last answer</button><p class="msg" id="msg2"></p></div>
<div id="zoom"><img id="zimg" alt="enlarged image"></div>
<script>
const $=id=>document.getElementById(id);
const token=new URLSearchParams(location.hash.slice(1)).get("t")||sessionStorage.getItem("t")||"";
if(token){sessionStorage.setItem("t",token);history.replaceState(null,"",location.pathname)}  // out of the URL bar
window.addEventListener("hashchange",()=>{if(new URLSearchParams(location.hash.slice(1)).get("t")){sessionStorage.
removeItem("t");location.reload()}});  // another person's link pasted into this tab: theirs from now on
const WORDS={left:"left better",right:"right better",both_unacceptable:"both unacceptable",cannot_tell:
"cannot tell",real:"real",synthetic:"synthetic"};
const KEYS={preference:{"1":"left","2":"right","3":"both_unacceptable","4":"cannot_tell"},real_or_synth:{r:"real",
s:"synthetic"}};
let st=null, cur=null, busy=false, readyAt=Infinity, rating=null, held=new Set(), stale=new Set();
async function call(path,body){let r;try{r=await fetch(path,{method:body?"POST":"GET",headers:{"Content-Type":
"application/json","X-Annotator-Token":token},body:body?JSON.stringify(body):undefined})}catch(e){throw new Error(
"The server is not answering (it may have been stopped). Every answer you gave is saved; ask the organiser to "+
"restart it, then reload this page.")}const j=await r.json();if(!r.ok)throw new Error(j.error);return j}
function keymap(){return st.kind==="reader"?KEYS.real_or_synth:KEYS.preference}
function buttons(){const c=$("choices");c.innerHTML="";const km=keymap();for(const k in km){const b=document.
createElement("button");b.dataset.c=km[k];b.textContent=WORDS[km[k]]+" ("+k+")";c.appendChild(b)}
const u=document.createElement("button");u.id="undo";u.textContent="undo last (u)";c.appendChild(u);
const r=$("rate");r.innerHTML="";if(st.kind==="reader"){r.append("realism: ");for(let i=1;i<=5;i++){const b=
document.createElement("button");b.dataset.r=i;b.textContent=i;r.appendChild(b)}r.append(
" (1 clearly artificial, 5 as real as a real image; keys 1-5)")}
document.querySelectorAll("button").forEach(b=>b.addEventListener("mousedown",e=>e.preventDefault()))}
function intro(){const how=st.kind==="reader"?["One image at a time: is it a real image or a synthetic one? Rate "+
"how realistic it looks (1-5, keys 1-5), then answer real (r) or synthetic (s)."]:["Two images of the same "+
"condition: "+st.question,"Keys 1-4 answer (left better, right better, both unacceptable, cannot tell)."];
how.push("The first "+st.calibration+" are the same for every reader (they measure agreement); then your share.",
"Click an image to enlarge it; the window and level sliders change its contrast and brightness.",
"u undoes your last answer. A key held down answers once; the page waits a moment before it takes an answer.",
"You can stop at any time: this link resumes where you stopped.");$("howto").innerHTML="";for(const t of how){
const li=document.createElement("li");li.textContent=t;$("howto").appendChild(li)}$("hello").textContent=
"You are reading as "+st.annotator+". "+st.total+" to answer, "+st.done+" done."}
function show(s){st=s;cur=s.pair;busy=false;readyAt=Infinity;rating=null;stale=new Set(held);unzoom();
if(document.activeElement&&document.activeElement!==document.body)document.activeElement.blur();$("msg").textContent=
"";$("msg2").textContent="";if(!cur){$("work").style.display="none";$("end").style.display="block";$("tally").
textContent="You answered "+s.done+" of "+s.total+": "+Object.entries(s.tally).map(([k,v])=>v+" "+WORDS[k]).
join(", ")+".";return}$("end").style.display="none";$("work").style.display="block";$("me").textContent=
"reader: "+s.annotator;$("count").textContent=s.done+" / "+s.total+" answered";$("bar").max=s.total;$("bar").
value=s.done;$("q").textContent=s.question;$("cond").textContent=cur.text;$("note").value="";
document.querySelectorAll("button[data-r]").forEach(b=>b.classList.remove("on"));$("undo").disabled=!s.can_undo;
const box=$("imgs");box.innerHTML="";const imgs=cur.images.map(side=>{const f=document.createElement("figure"),i=
new Image();i.src="/img/"+cur.id+"/"+side;i.alt=side+" image";i.onclick=()=>zoom(i.src);f.appendChild(i);if(
side!=="image"){const c=document.createElement("figcaption");c.textContent=side+" ("+(side==="left"?1:2)+")";
f.appendChild(c)}box.appendChild(f);return i});enable(false);const id=cur.id;Promise.all(imgs.map(i=>i.decode())).then(()=>{
if(cur&&cur.id===id){readyAt=performance.now()+s.min_view_ms+50;setTimeout(()=>{if(cur&&cur.id===id&&!busy)
enable(true)},s.min_view_ms+60)}}).catch(()=>{if(cur&&cur.id===id)$("msg").textContent=
"An image did not load; reload the page."})}
function enable(on){document.querySelectorAll("button[data-c]").forEach(b=>b.disabled=!on)}
function zoom(src){$("zimg").src=src;$("zoom").style.display="flex"}
function unzoom(){$("zoom").style.display="none"}
function ready(){return cur&&!busy&&performance.now()>=readyAt}
async function send(path,body,errbox){const id=cur&&cur.id;busy=true;enable(false);try{show(await call(path,body))}
catch(e){busy=false;if(cur&&cur.id===id){enable(performance.now()>=readyAt);$(errbox).textContent=e.message}
else if(!cur)$(errbox).textContent=e.message}}
function answer(c){if(!ready())return;if(st.kind==="reader"&&rating===null){$("msg").textContent=
"Rate the realism first (1-5)";return}send("/api/answer",{pair_id:cur.id,choice:c,note:$("note").value,
rating:st.kind==="reader"?rating:null},"msg")}
function rate(n){if(st.kind!=="reader"||!cur)return;rating=n;document.querySelectorAll("button[data-r]").forEach(
b=>b.classList.toggle("on",+b.dataset.r===n))}
function undo(){if(busy)return;send("/api/undo",{},cur?"msg":"msg2")}
function wl(){const w=+$("win").value,l=+$("lev").value;document.querySelectorAll("#wl feComponentTransfer>*").
forEach(f=>{f.setAttribute("slope",1/w);f.setAttribute("intercept",0.5-l/w)})}
$("win").oninput=wl;$("lev").oninput=wl;$("wlreset").onclick=()=>{$("win").value=1;$("lev").value=0.5;wl()};
$("zoom").onclick=unzoom;
document.addEventListener("click",e=>{const b=e.target.closest("button");if(!b)return;b.blur();if(b.dataset.c)
answer(b.dataset.c);else if(b.dataset.r)rate(+b.dataset.r);else if(b.id==="undo"||b.id==="undo2")undo()});
document.addEventListener("keyup",e=>{held.delete(e.code);stale.delete(e.code)});
document.addEventListener("keydown",e=>{const fresh=!e.repeat&&!held.has(e.code)&&!stale.has(e.code),k=e.key.
toLowerCase();held.add(e.code);if(k==="escape")return unzoom();if(!fresh||!st||e.target.id==="note"||$("work").
style.display!=="block"||$("zoom").style.display==="flex")return;const c=keymap()[k];if(c)answer(c);else if(
st.kind==="reader"&&"12345".includes(k)&&k.length===1)rate(+k);else if(k==="u")undo()});
window.addEventListener("blur",()=>held.clear());
$("start").onclick=()=>call("/api/state").then(s=>{st=s;$("intro").style.display="none";buttons();show(s)}).
catch(e=>{$("msg0").textContent=e.message});  // fetched again: the first pair's time on screen starts now
if(token){$("nolink").style.display="none";call("/api/state").then(s=>{st=s;intro();$("intro").style.display=
"block"}).catch(e=>{$("nolink").style.display="block";$("nolink").append(e.message)})}
</script></body></html>"""
