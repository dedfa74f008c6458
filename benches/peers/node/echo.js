// node `ws` echo server: every message back to its sender, as text or binary as it came.
//   node echo.js [port=9004]
'use strict';
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 9004);
const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => {});
});
wss.on('listening', () => console.error(`node ws echo on 127.0.0.1:${port}`));
