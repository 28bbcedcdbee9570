/* The Cut-Out sync client.
 *
 * A placeholder until the client has its own issue: the server fills in the
 * URL it was loaded from, so that an app that loads this script from a sync
 * server talks to that server by default (SPEC.md JS-1).
 */
var CutoutSync = (function () {
  "use strict";
  var defaultServerUrl = "{{server_url}}";
  return { defaultServerUrl: defaultServerUrl };
})();
