/* uWebSockets echo server, one thread, for scripts/compare.sh.
 *
 * The registries carry no uWebSockets package of its own, but PyPI's `socketify` (0.0.31)
 * ships uWebSockets and uSockets compiled into one shared library with uWebSockets' C API
 * (`capi/libuwebsockets.h`; the event loop is libuv). This program declares the part of that
 * API it uses and echoes every message with the opcode it came with, as uWS's own
 * EchoServer example does. Built by build.sh. */
#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct us_socket_context_options_t {
  const char *key_file_name, *cert_file_name, *passphrase, *dh_params_file_name,
      *ca_file_name, *ssl_ciphers;
  int ssl_prefer_low_memory_usage;
};
struct us_listen_socket_t;
typedef struct uws_app_s uws_app_t;
typedef struct uws_req_s uws_req_t;
typedef struct uws_res_s uws_res_t;
typedef struct uws_socket_context_s uws_socket_context_t;
typedef struct uws_websocket_s uws_websocket_t;
typedef int uws_opcode_t;
typedef struct {
  int port;
  const char *host;
  int options;
} uws_app_listen_config_t;
typedef struct {
  int compression; /* 0: DISABLED */
  unsigned int maxPayloadLength;
  unsigned short idleTimeout;
  unsigned int maxBackpressure;
  bool closeOnBackpressureLimit, resetIdleTimeoutOnSend, sendPingsAutomatically;
  unsigned short maxLifetime;
  void (*upgrade)(uws_res_t *, uws_req_t *, uws_socket_context_t *, void *);
  void (*open)(uws_websocket_t *, void *);
  void (*message)(uws_websocket_t *, const char *, size_t, uws_opcode_t, void *);
  void (*drain)(uws_websocket_t *, void *);
  void (*ping)(uws_websocket_t *, const char *, size_t, void *);
  void (*pong)(uws_websocket_t *, const char *, size_t, void *);
  void (*close)(uws_websocket_t *, int, const char *, size_t, void *);
  void (*subscription)(uws_websocket_t *, const char *, size_t, int, int, void *);
} uws_socket_behavior_t;
typedef void (*uws_listen_handler)(struct us_listen_socket_t *, uws_app_listen_config_t, void *);

uws_app_t *uws_create_app(int ssl, struct us_socket_context_options_t options);
void uws_ws(int ssl, uws_app_t *app, const char *pattern, uws_socket_behavior_t behavior,
            void *user_data);
int uws_ws_send(int ssl, uws_websocket_t *ws, const char *message, size_t length,
                uws_opcode_t opcode);
void uws_app_listen_with_config(int ssl, uws_app_t *app, uws_app_listen_config_t config,
                                uws_listen_handler handler, void *user_data);
void uws_app_run(int ssl, uws_app_t *app);

static void on_message(uws_websocket_t *ws, const char *msg, size_t len, uws_opcode_t op,
                       void *user) {
  (void)user;
  uws_ws_send(0, ws, msg, len, op);
}

static void on_listen(struct us_listen_socket_t *ls, uws_app_listen_config_t c, void *user) {
  (void)user;
  if (!ls) {
    fprintf(stderr, "uws-echo: cannot listen on %s:%d\n", c.host, c.port);
    exit(1);
  }
  fprintf(stderr, "uws-echo: listening on %s:%d\n", c.host, c.port);
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: uws-echo PORT (listens on 127.0.0.1)\n");
    return 2;
  }
  struct us_socket_context_options_t opts;
  memset(&opts, 0, sizeof opts);
  uws_app_t *app = uws_create_app(0, opts);
  uws_socket_behavior_t b;
  memset(&b, 0, sizeof b);
  b.maxPayloadLength = 16 * 1024 * 1024;
  b.idleTimeout = 120; /* seconds; loadgen's idle runs hold connections 10 s */
  b.maxBackpressure = 64 * 1024 * 1024;
  b.message = on_message;
  uws_ws(0, app, "/*", b, NULL);
  uws_app_listen_config_t c = {atoi(argv[1]), "127.0.0.1", 0};
  uws_app_listen_with_config(0, app, c, on_listen, NULL);
  uws_app_run(0, app);
  return 0;
}
